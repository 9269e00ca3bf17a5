"""KIE's API families: where each creates and reports tasks, and what its states mean.

The same value means different things per family (``successFlag`` 2 is a failure for Veo and
*generating* for Suno cover), so every family has its own map onto :class:`Outcome`; there is
no global one. :func:`read_status` reads the ``data`` object of a status answer
(record-info, recordInfo, record-detail) with those maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final, Literal

from kied.core._extract import Fields, Outcome, read_fields, scan

if TYPE_CHECKING:
    from kied.core._json import JsonValue

__all__ = ["SPECS", "Family", "FamilySpec", "StatusReading", "read_status"]


class Family(StrEnum):
    MARKET = "market"
    VEO = "veo"
    RUNWAY = "runway"
    ALEPH = "aleph"
    SUNO = "suno"
    SUNO_LYRICS = "suno-lyrics"
    SUNO_WAV = "suno-wav"
    SUNO_VOCAL = "suno-vocal-removal"
    SUNO_MIDI = "suno-midi"
    SUNO_COVER = "suno-cover"
    GPT4O = "4o"
    FLUX_KONTEXT = "flux-kontext"
    MJ = "mj"
    LUMA = "luma"


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilySpec:
    """Where a family creates tasks (POST) and reports on them (GET ``?taskId=``)."""

    family: Family
    create_path: str
    status_path: str


def _spec(family: Family, create_path: str, status_path: str) -> tuple[Family, FamilySpec]:
    return family, FamilySpec(family=family, create_path=create_path, status_path=status_path)


SPECS: Final[Mapping[Family, FamilySpec]] = dict(
    [
        _spec(Family.MARKET, "/api/v1/jobs/createTask", "/api/v1/jobs/recordInfo"),
        _spec(Family.VEO, "/api/v1/veo/generate", "/api/v1/veo/record-info"),
        _spec(Family.RUNWAY, "/api/v1/runway/generate", "/api/v1/runway/record-detail"),
        _spec(Family.ALEPH, "/api/v1/aleph/generate", "/api/v1/aleph/record-info"),
        _spec(Family.SUNO, "/api/v1/generate", "/api/v1/generate/record-info"),
        _spec(Family.SUNO_LYRICS, "/api/v1/lyrics", "/api/v1/lyrics/record-info"),
        _spec(Family.SUNO_WAV, "/api/v1/wav/generate", "/api/v1/wav/record-info"),
        _spec(
            Family.SUNO_VOCAL,
            "/api/v1/vocal-removal/generate",
            "/api/v1/vocal-removal/record-info",
        ),
        _spec(Family.SUNO_MIDI, "/api/v1/midi/generate", "/api/v1/midi/record-info"),
        _spec(Family.SUNO_COVER, "/api/v1/suno/cover/generate", "/api/v1/suno/cover/record-info"),
        _spec(Family.GPT4O, "/api/v1/gpt4o-image/generate", "/api/v1/gpt4o-image/record-info"),
        _spec(
            Family.FLUX_KONTEXT,
            "/api/v1/flux/kontext/generate",
            "/api/v1/flux/kontext/record-info",
        ),
        _spec(Family.MJ, "/api/v1/mj/generate", "/api/v1/mj/record-info"),
        _spec(Family.LUMA, "/api/v1/modify/generate", "/api/v1/modify/record-info"),
    ]
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReading:
    """What one status answer says about a task."""

    outcome: Outcome
    kie_state: str | None  # the family's own state value, as text ("generating", "1", …)
    result_urls: tuple[str, ...]
    error_code: str | None
    error_message: str | None


# -- the maps (the normalisation table) ---------------------------------------------------

_P, _S, _F, _U = Outcome.PENDING, Outcome.SUCCESS, Outcome.FAIL, Outcome.UNKNOWN

#: Reads one field's value (as text) into an outcome; UNKNOWN for values the family lacks.
_Reader = Callable[[str, Fields], Outcome]
#: One state-like field of :class:`Fields`, by name.
_Field = Literal["state", "status", "success_flag"]


def _table(mapping: Mapping[str, Outcome]) -> _Reader:
    def read(value: str, _fields: Fields) -> Outcome:
        return mapping.get(value.casefold(), _U)

    return read


_GENERATE_FAILED: Final = re.compile(r"generate_.+_failed")


def _suno_style(value: str, fields: Fields) -> Outcome:
    value = value.casefold()
    if value in ("pending", "text_success", "first_success"):
        return _P
    if value == "success":
        return _S
    if value in ("create_task_failed", "sensitive_word_error") or _GENERATE_FAILED.fullmatch(value):
        return _F
    if value == "callback_exception":
        # The callback failed, not necessarily the generation: results decide.
        return _S if fields.has_urls else _U
    return _U


def _aleph(value: str, fields: Fields) -> Outcome:
    # Aleph's 0 means both "running" and "failed"; an error tells them apart.
    if value == "1":
        return _S
    if value == "0":
        return _F if fields.has_error else _P
    return _U


_MARKET_STATE: Final = _table(
    {"waiting": _P, "queuing": _P, "generating": _P, "success": _S, "fail": _F}
)
_RUNWAY_STATE: Final = _table(
    {"wait": _P, "queueing": _P, "generating": _P, "success": _S, "fail": _F}
)
_NUMBERED_FLAG: Final = _table({"0": _P, "1": _S, "2": _F, "3": _F})  # Veo, MJ, Flux, MIDI
_LUMA_FLAG: Final = _table({"0": _P, "1": _S, "4": _S, "2": _F, "3": _F})
_COVER_FLAG: Final = _table({"0": _P, "2": _P, "1": _S, "3": _F})
_GPT4O_STATUS: Final = _table(
    {"generating": _P, "success": _S, "create_task_failed": _F, "generate_failed": _F}
)
_GPT4O_FLAG: Final = _table({"0": _P, "1": _S, "2": _F})
# MIDI callbacks (and record-info's midiData) say ``state: complete`` on success.
_MIDI_STATE: Final = _table({"complete": _S})


#: Per family, the fields that carry its state, in the order they are trusted.
_READERS: Final[Mapping[Family, tuple[tuple[_Field, _Reader], ...]]] = {
    Family.MARKET: (("state", _MARKET_STATE),),
    Family.VEO: (("success_flag", _NUMBERED_FLAG),),
    Family.RUNWAY: (("state", _RUNWAY_STATE),),
    Family.ALEPH: (("success_flag", _aleph),),
    Family.SUNO: (("status", _suno_style),),
    Family.SUNO_LYRICS: (("status", _suno_style),),
    Family.SUNO_WAV: (("status", _suno_style),),
    Family.SUNO_VOCAL: (("status", _suno_style),),
    Family.SUNO_MIDI: (("success_flag", _NUMBERED_FLAG), ("state", _MIDI_STATE)),
    Family.SUNO_COVER: (("success_flag", _COVER_FLAG), ("status", _suno_style)),
    Family.GPT4O: (("status", _GPT4O_STATUS), ("success_flag", _GPT4O_FLAG)),
    Family.FLUX_KONTEXT: (("success_flag", _NUMBERED_FLAG),),
    Family.MJ: (("success_flag", _NUMBERED_FLAG),),
    Family.LUMA: (("success_flag", _LUMA_FLAG),),
}


def _judge(family: Family, fields: Fields) -> tuple[Outcome, str] | None:
    """The family's reading of its state field, with that field's value; None if it has none."""
    for name, read in _READERS[family]:
        value: str | None = getattr(fields, name)
        if value is not None:
            return read(value, fields), value
    return None


#: One family for each distinct way of reading the fields: families that read them alike
#: (Veo, MJ and Flux; the Suno-style ones) hold the same opinion, so one of them is asked.
_DISTINCT: Final = tuple({readers: family for family, readers in _READERS.items()}.values())


def _judge_any(fields: Fields) -> Outcome | None:
    """The reading when the family is not known: what every family that has a meaning says.

    A value counts only when all families that give it a definite meaning agree (``successFlag``
    1 is success everywhere; 2 is a failure for Veo but *generating* for Suno cover, so it is
    UNKNOWN). None when no state field is present.
    """
    opinions = {judged[0] for family in _DISTINCT if (judged := _judge(family, fields)) is not None}
    if not opinions:
        return None
    definite = opinions - {_U}
    return definite.pop() if len(definite) == 1 else _U


# -- status answers -----------------------------------------------------------------------

_UNREADABLE: Final = StatusReading(
    outcome=_U, kie_state=None, result_urls=(), error_code=None, error_message=None
)


def read_status(family: Family, data: JsonValue) -> StatusReading:
    """Read the ``data`` object of a ``family`` status answer. Never raises.

    Args:
        family: whose status endpoint answered; it decides what the state values mean.
        data: the answer's ``data`` object (``null`` or anything malformed reads UNKNOWN).

    Returns:
        The outcome per the family's map, its raw state value, the result URLs (in
        ``resultJson``, ``response``, ``videoInfo``, ``resultInfoJson``, …) and any error
        code and message (``failCode``/``failMsg``, ``errorCode``/``errorMessage``).
    """
    try:
        return _read_status(family, data)
    except Exception:  # a status answer is data: reading one never takes kied down
        return _UNREADABLE


def _read_status(family: Family, data: JsonValue) -> StatusReading:
    if not isinstance(data, dict):
        return _UNREADABLE
    found = scan(data)
    # The state and error fields sit at the top of ``data`` in every family.
    top = read_fields(found.objects[:1], has_urls=bool(found.urls))
    judged = _judge(family, top)
    outcome, kie_state = judged if judged is not None else (_U, None)
    return StatusReading(
        outcome=outcome,
        kie_state=kie_state,
        result_urls=found.urls,
        error_code=top.error_code,
        error_message=top.error_message,
    )
