"""What the simulated KIE families look like on the wire.

Pure data and functions: the task record, the per-family state spellings, and the bodies of
status answers and callbacks, in the shapes KIE's documentation gives for each family. No Trio,
no HTTP. The simulator decides *when* things happen; this module decides *what they look like*.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "FAMILIES",
    "Failure",
    "Family",
    "FamilySpec",
    "FileRequests",
    "Reply",
    "SimTask",
    "Stage",
    "callback_body",
    "dumps",
    "kie_state",
    "new_task_id",
    "plan_for",
    "status_data",
]

Json = dict[str, Any]


def dumps(value: object) -> bytes:
    """Compact UTF-8 JSON, the way KIE sends it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer: status, body and headers, independent of the web framework."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    #: the task a create answer hands out, so that the web layer can report the answer sent
    #: (:meth:`Simulator.create_answered`); never on the wire
    task_id: str | None = None

    @classmethod
    def envelope(cls, code: int, msg: str, data: object = None, *, http_status: int = 200) -> Reply:
        """KIE's ``{"code", "msg", "data"}`` envelope; errors still travel as HTTP 200."""
        return cls(http_status, dumps({"code": code, "msg": msg, "data": data}))

    @classmethod
    def json(cls, value: object, *, http_status: int = 200) -> Reply:
        return cls(http_status, dumps(value))


class Family(StrEnum):
    """A KIE API family: its own endpoints, state spellings and callback shapes."""

    MARKET = "market"
    VEO = "veo"
    RUNWAY = "runway"
    ALEPH = "aleph"
    SUNO = "suno"
    GPT4O = "4o"
    FLUX_KONTEXT = "flux-kontext"
    MIDJOURNEY = "mj"
    LUMA = "luma"


class Stage(StrEnum):
    """A step a task takes that KIE reports by callback.

    Only Suno has non-terminal stages (``text`` and ``first``); every family ends in
    ``success`` or ``fail``.
    """

    TEXT = "text"
    FIRST = "first"
    SUCCESS = "success"
    FAIL = "fail"


TERMINAL_STAGES: Final = frozenset({Stage.SUCCESS, Stage.FAIL})

#: Where in a task's duration each stage falls.
STAGE_AT: Final[Mapping[Stage, float]] = {
    Stage.TEXT: 1 / 3,
    Stage.FIRST: 2 / 3,
    Stage.SUCCESS: 1.0,
    Stage.FAIL: 1.0,
}


@dataclass(frozen=True, slots=True)
class Failure:
    """One way a task of a family can fail.

    ``code`` is the callback envelope code (and the status ``errorCode``), ``msg`` the reason;
    ``flag`` is the family's own failure marker in status answers (Market ``failCode``, the
    ``successFlag`` of Veo/Flux/MJ/Luma, Suno's or 4o's ``status``), or ``None``.
    """

    code: int
    msg: str
    flag: int | str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FamilySpec:
    family: Family
    create_path: str
    status_path: str
    id_prefix: str
    uuid_ids: bool
    failures: tuple[Failure, ...]


_CONTENT_POLICY = "Your prompt was flagged by Website as violating content policies."
_INTERNAL = "Internal Error, Please try again later."

FAMILIES: Final[Mapping[Family, FamilySpec]] = {
    spec.family: spec
    for spec in (
        FamilySpec(
            family=Family.MARKET,
            create_path="/api/v1/jobs/createTask",
            status_path="/api/v1/jobs/recordInfo",
            id_prefix="",
            uuid_ids=False,
            failures=(
                Failure(501, "Internal server error", "500"),
                Failure(501, "Generation failed, please try again later.", "GENERATION_FAILED"),
            ),
        ),
        FamilySpec(
            family=Family.VEO,
            create_path="/api/v1/veo/generate",
            status_path="/api/v1/veo/record-info",
            id_prefix="veo_",
            uuid_ids=False,
            failures=(
                Failure(400, _CONTENT_POLICY, 2),
                Failure(
                    422,
                    "Your request was rejected by Flow(Your prompt was flagged by Website as "
                    "violating content policies). You may consider using our other fallback "
                    "channels, which are likely to succeed. Please refer to the documentation.",
                    2,
                ),
                Failure(500, _INTERNAL, 3),
                Failure(501, "Video generation task failed", 3),
            ),
        ),
        FamilySpec(
            family=Family.RUNWAY,
            create_path="/api/v1/runway/generate",
            status_path="/api/v1/runway/record-detail",
            id_prefix="",
            uuid_ids=True,
            failures=(
                Failure(400, "Your prompt was caught by our AI moderator."),
                Failure(500, "Generation failed, please try again later."),
            ),
        ),
        FamilySpec(
            family=Family.ALEPH,
            create_path="/api/v1/aleph/generate",
            status_path="/api/v1/aleph/record-info",
            id_prefix="",
            uuid_ids=True,
            failures=(
                Failure(400, "Inappropriate content detected. Please replace the video."),
                Failure(500, _INTERNAL),
            ),
        ),
        FamilySpec(
            family=Family.SUNO,
            create_path="/api/v1/generate",
            status_path="/api/v1/generate/record-info",
            id_prefix="",
            uuid_ids=False,
            failures=(
                Failure(
                    531,
                    "Sorry, the generation failed due to an issue. Your credits have been "
                    "refunded. Please try again.",
                    "GENERATE_AUDIO_FAILED",
                ),
                Failure(501, "Audio generation failed.", "GENERATE_AUDIO_FAILED"),
                Failure(400, "The lyrics contain copyrighted material.", "SENSITIVE_WORD_ERROR"),
                Failure(408, "Timeout.", "GENERATE_AUDIO_FAILED"),
            ),
        ),
        FamilySpec(
            family=Family.GPT4O,
            create_path="/api/v1/gpt4o-image/generate",
            status_path="/api/v1/gpt4o-image/record-info",
            id_prefix="4o_",
            uuid_ids=False,
            failures=(
                Failure(
                    400,
                    "Your content was flagged as violating content policies.",
                    "GENERATE_FAILED",
                ),
                Failure(
                    451,
                    "Failed to fetch the image. Kindly verify any access limits set by you or "
                    "your service provider.",
                    "CREATE_TASK_FAILED",
                ),
                Failure(500, _INTERNAL, "GENERATE_FAILED"),
            ),
        ),
        FamilySpec(
            family=Family.FLUX_KONTEXT,
            create_path="/api/v1/flux/kontext/generate",
            status_path="/api/v1/flux/kontext/record-info",
            id_prefix="fk_",
            uuid_ids=False,
            failures=(
                Failure(400, _CONTENT_POLICY, 2),
                Failure(500, _INTERNAL, 3),
                Failure(501, "Image generation task failed", 3),
            ),
        ),
        FamilySpec(
            family=Family.MIDJOURNEY,
            create_path="/api/v1/mj/generate",
            status_path="/api/v1/mj/record-info",
            id_prefix="mj_",
            uuid_ids=False,
            failures=(
                Failure(500, "Image generation failed.", 3),
                Failure(500, "The task could not be created.", 2),
            ),
        ),
        FamilySpec(
            family=Family.LUMA,
            create_path="/api/v1/modify/generate",
            status_path="/api/v1/modify/record-info",
            id_prefix="lu_",
            uuid_ids=False,
            failures=(
                Failure(500, "Video modification failed.", 3),
                Failure(500, "The task could not be created.", 2),
            ),
        ),
    )
}


def new_task_id(family: Family) -> str:
    """A fresh id in the family's style.

    Ids are always random, never drawn from the seeded generator, so that a simulator
    restarted with the same ``--seed`` never hands out an id kied has already stored.
    """
    spec = FAMILIES[family]
    if spec.uuid_ids:
        return str(uuid.uuid4())
    return spec.id_prefix + uuid.uuid4().hex


def plan_for(family: Family, *, success: bool) -> tuple[Stage, ...]:
    """The stages a task goes through, in order; each one is reported by a callback."""
    if family is Family.SUNO:
        return (Stage.TEXT, Stage.FIRST, Stage.SUCCESS) if success else (Stage.TEXT, Stage.FAIL)
    return (Stage.SUCCESS,) if success else (Stage.FAIL,)


@dataclass(slots=True)
class FileRequests:
    """What happened to the requests for one result file."""

    #: every request, answered or not
    requests: int = 0
    #: answered 503 (``--file-fail-first``)
    refused: int = 0
    #: answered 404 because the file had expired (``--file-ttl``)
    expired: int = 0
    #: bodies sent in full
    served: int = 0
    #: bytes of body sent, complete bodies or not
    bytes_sent: int = 0


@dataclass(slots=True, kw_only=True, eq=False)
class SimTask:
    """One simulated KIE task: what was asked, what it will do, and what has happened so far."""

    task_id: str
    family: Family
    request: Json
    param_json: str
    callback_url: str | None
    #: trio time and wall time (epoch seconds) of creation
    created_t: float
    created_at: float
    duration_s: float
    failure: Failure | None
    plan: tuple[Stage, ...]
    stuck: bool
    faults: frozenset[str]
    malformed_kind: str | None
    #: how many stages of ``plan`` have happened
    applied: int = 0
    #: bumped when the plan is replaced, so that stale timer entries are ignored
    generation: int = 0
    completed_at: float | None = None
    #: trio time of reaching success or fail (result files expire from here)
    ended_t: float | None = None
    status_queries: int = 0
    status_errors: int = 0
    last_status_query_at: float | None = None
    callbacks_sent: int = 0
    callbacks_delivered: int = 0
    callbacks_given_up: int = 0
    callbacks_dropped: int = 0
    callback_first_sent_at: float | None = None
    callback_last_sent_at: float | None = None
    callback_first_delivered_at: float | None = None
    #: the create answer carrying the task id was sent in full (not cut short by the client)
    create_answered: bool = False
    stages_reported: list[str] = field(default_factory=list)
    #: requests for the task's result files, by file name
    files: dict[str, FileRequests] = field(default_factory=dict)

    @property
    def reached(self) -> Stage | None:
        """The last stage that has happened, or ``None`` before the first."""
        return self.plan[self.applied - 1] if self.applied else None

    @property
    def outcome(self) -> str:
        """``pending``, ``success`` or ``fail``."""
        reached = self.reached
        return reached.value if reached in TERMINAL_STAGES else "pending"

    def due_t(self, index: int) -> float:
        """Trio time at which stage ``index`` of the plan is due."""
        return self.created_t + STAGE_AT[self.plan[index]] * self.duration_s

    def progress(self, now_t: float) -> float:
        """Fraction of the duration that has passed, in [0, 1]."""
        if self.duration_s <= 0:
            return 1.0
        return min(max((now_t - self.created_t) / self.duration_s, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _ms(t: float | None) -> int | None:
    return None if t is None else round(t * 1000)


def _datetime(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _url(base_url: str, task: SimTask, name: str) -> str:
    return f"{base_url}/_sim/files/{task.task_id}/{name}"


def _failure(task: SimTask) -> Failure:
    assert task.failure is not None  # only called for failed tasks
    return task.failure


def _track(task: SimTask, n: int, base_url: str, *, camel: bool) -> Json:
    prompt = task.request.get("prompt")
    track_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kied-simulate:{task.task_id}:{n}"))
    created = _datetime(task.created_at + task.duration_s * STAGE_AT[Stage.FIRST])
    if camel:
        return {
            "id": track_id,
            "audioUrl": _url(base_url, task, f"{n}.mp3"),
            "streamAudioUrl": _url(base_url, task, f"{n}.stream.mp3"),
            "imageUrl": _url(base_url, task, f"{n}.jpeg"),
            "prompt": prompt if isinstance(prompt, str) else "",
            "modelName": "chirp-v4",
            "title": task.request.get("title") or "Simulated track",
            "tags": task.request.get("style") or "",
            "createTime": created,
            "duration": 180.0 + 7.5 * n,
        }
    return {
        "id": track_id,
        "audio_url": _url(base_url, task, f"{n}.mp3"),
        "stream_audio_url": _url(base_url, task, f"{n}.stream.mp3"),
        "image_url": _url(base_url, task, f"{n}.jpeg"),
        "prompt": prompt if isinstance(prompt, str) else "",
        "model_name": "chirp-v4",
        "title": task.request.get("title") or "Simulated track",
        "tags": task.request.get("style") or "",
        "createTime": created,
        "duration": 180.0 + 7.5 * n,
    }


# --------------------------------------------------------------------------------------------
# Family state spellings


def _phase(progress: float) -> int:
    """0, 1 or 2: the family's waiting, queued and generating spellings of "pending"."""
    if progress < 0.1:
        return 0
    if progress < 0.25:
        return 1
    return 2


def kie_state(task: SimTask, progress: float) -> str | int:
    """The task's state in its family's own spelling (``state``, ``status`` or ``successFlag``)."""
    reached = task.reached
    family = task.family
    if family is Family.MARKET or family is Family.RUNWAY:
        if reached is Stage.SUCCESS:
            return "success"
        if reached is Stage.FAIL:
            return "fail"
        spellings = ("waiting", "queuing") if family is Family.MARKET else ("wait", "queueing")
        return (*spellings, "generating")[_phase(progress)]
    if family is Family.SUNO:
        if reached is Stage.FAIL:
            return str(_failure(task).flag)
        return {
            None: "PENDING",
            Stage.TEXT: "TEXT_SUCCESS",
            Stage.FIRST: "FIRST_SUCCESS",
            Stage.SUCCESS: "SUCCESS",
        }[reached]
    if family is Family.GPT4O:
        if reached is Stage.FAIL:
            return str(_failure(task).flag)
        return "SUCCESS" if reached is Stage.SUCCESS else "GENERATING"
    # successFlag families
    if reached is Stage.SUCCESS:
        return 1
    if reached is Stage.FAIL:
        # Aleph has no failure flag of its own: 0 plus an error code means failed.
        return 0 if family is Family.ALEPH else int(_failure(task).flag or 2)
    return 0


# --------------------------------------------------------------------------------------------
# Status answers (the ``data`` of a record-info / recordInfo answer)


def _market_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    urls = [_url(base_url, task, "0.png")]
    done = task.completed_at
    return {
        "taskId": task.task_id,
        "model": task.request.get("model"),
        "state": kie_state(task, progress),
        "param": task.param_json,
        "resultJson": dumps({"resultUrls": urls}).decode() if reached is Stage.SUCCESS else None,
        "failCode": str(_failure(task).flag) if reached is Stage.FAIL else "",
        "failMsg": _failure(task).msg if reached is Stage.FAIL else "",
        "costTime": (
            _ms(done - task.created_at) if done is not None and reached is Stage.SUCCESS else None
        ),
        "completeTime": _ms(done),
        "createTime": _ms(task.created_at),
        "updateTime": _ms(done if done is not None else task.created_at),
    }


def _veo_response(task: SimTask, base_url: str) -> Json:
    url = _url(base_url, task, "0.mp4")
    origin = [_url(base_url, task, "0.origin.mp4")] if _veo_has_origin(task) else []
    return {
        "taskId": task.task_id,
        "resultUrls": [url],
        "fullResultUrls": [url],
        "originUrls": origin,
        "resolution": "1080p" if not origin else "720p",
    }


def _veo_has_origin(task: SimTask) -> bool:
    ratio = task.request.get("aspectRatio") or task.request.get("aspect_ratio")
    return isinstance(ratio, str) and ratio != "16:9"


def _veo_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    return {
        "taskId": task.task_id,
        "paramJson": task.param_json,
        "completeTime": _datetime(task.completed_at),
        "response": _veo_response(task, base_url) if reached is Stage.SUCCESS else None,
        "successFlag": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
        "createTime": _datetime(task.created_at),
        "fallbackFlag": False,
    }


def _runway_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    video = None
    if reached is Stage.SUCCESS:
        video = {
            "videoId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"kied-simulate:{task.task_id}")),
            "taskId": task.task_id,
            "videoUrl": _url(base_url, task, "0.mp4"),
            "imageUrl": _url(base_url, task, "0.png"),
        }
    return {
        "taskId": task.task_id,
        "parentTaskId": "",
        "generateParam": {
            "prompt": task.request.get("prompt", ""),
            "imageUrl": task.request.get("imageUrl", ""),
            "expandPrompt": bool(task.request.get("expandPrompt", False)),
        },
        "state": kie_state(task, progress),
        "generateTime": _datetime(task.completed_at) or "",
        "videoInfo": video,
        "failCode": _failure(task).code if reached is Stage.FAIL else None,
        "failMsg": _failure(task).msg if reached is Stage.FAIL else "",
        "expireFlag": 0,
    }


def _aleph_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    response = None
    if reached is Stage.SUCCESS:
        response = {
            "taskId": task.task_id,
            "resultVideoUrl": _url(base_url, task, "0.mp4"),
            "resultImageUrl": _url(base_url, task, "0.png"),
        }
    return {
        "taskId": task.task_id,
        "paramJson": task.param_json,
        "response": response,
        "completeTime": _iso(task.completed_at),
        "createTime": _iso(task.created_at),
        "successFlag": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else 0,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
    }


def _suno_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    tracks = {Stage.TEXT: 0, Stage.FIRST: 1, Stage.SUCCESS: 2}
    response = None
    if reached in tracks:
        assert reached is not None
        response = {
            "taskId": task.task_id,
            "sunoData": [_track(task, n, base_url, camel=True) for n in range(tracks[reached])],
        }
    return {
        "taskId": task.task_id,
        "parentMusicId": "",
        "param": task.param_json,
        "response": response,
        "status": kie_state(task, progress),
        "type": "GENERATE",
        "operationType": "generate",
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else None,
        "createTime": _ms(task.created_at),
    }


def _gpt4o_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    if reached is Stage.SUCCESS:
        flag, shown = 1, 1.0
    elif reached is Stage.FAIL:
        flag, shown = 2, progress
    else:
        flag, shown = 0, min(progress, 0.99)
    return {
        "taskId": task.task_id,
        "paramJson": task.param_json,
        "completeTime": _ms(task.completed_at),
        "response": (
            {"resultUrls": [_url(base_url, task, "0.png")]} if reached is Stage.SUCCESS else None
        ),
        "successFlag": flag,
        "status": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
        "createTime": _ms(task.created_at),
        "progress": f"{shown:.2f}",
    }


def _flux_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    response = None
    if reached is Stage.SUCCESS:
        response = {
            "originImageUrl": _url(base_url, task, "0.origin.jpg"),
            "resultImageUrl": _url(base_url, task, "0.jpg"),
        }
    return {
        "taskId": task.task_id,
        "paramJson": task.param_json,
        "completeTime": _ms(task.completed_at),
        "response": response,
        "successFlag": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
        "createTime": _ms(task.created_at),
    }


def _mj_urls(task: SimTask, base_url: str) -> list[str]:
    return [_url(base_url, task, f"0_{n}.jpeg") for n in range(4)]


def _mj_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    info = None
    if reached is Stage.SUCCESS:
        info = {"resultUrls": [{"resultUrl": u} for u in _mj_urls(task, base_url)]}
    return {
        "taskId": task.task_id,
        "taskType": task.request.get("taskType", "mj_txt2img"),
        "paramJson": task.param_json,
        "completeTime": _ms(task.completed_at),
        "resultInfoJson": info,
        "successFlag": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
        "createTime": _ms(task.created_at),
    }


def _luma_status(task: SimTask, progress: float, base_url: str) -> Json:
    reached = task.reached
    return {
        "taskId": task.task_id,
        "paramJson": task.param_json,
        "completeTime": _ms(task.completed_at),
        "response": (
            {"resultUrls": [_url(base_url, task, "0.mp4")]} if reached is Stage.SUCCESS else None
        ),
        "successFlag": kie_state(task, progress),
        "errorCode": _failure(task).code if reached is Stage.FAIL else None,
        "errorMessage": _failure(task).msg if reached is Stage.FAIL else "",
        "createTime": _ms(task.created_at),
    }


_STATUS: Final[Mapping[Family, Callable[[SimTask, float, str], Json]]] = {
    Family.MARKET: _market_status,
    Family.VEO: _veo_status,
    Family.RUNWAY: _runway_status,
    Family.ALEPH: _aleph_status,
    Family.SUNO: _suno_status,
    Family.GPT4O: _gpt4o_status,
    Family.FLUX_KONTEXT: _flux_status,
    Family.MIDJOURNEY: _mj_status,
    Family.LUMA: _luma_status,
}


def status_data(task: SimTask, *, progress: float, base_url: str) -> Json:
    """The ``data`` object of a successful status answer for ``task``."""
    return _STATUS[task.family](task, progress, base_url)


# --------------------------------------------------------------------------------------------
# Callback bodies (what KIE POSTs to callBackUrl)


def _market_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    data = _market_status(task, 1.0, base_url)
    if stage is Stage.SUCCESS:
        data["failCode"] = None
        data["failMsg"] = None
        data["creditsConsumed"] = 4
        return {"code": 200, "msg": "Playground task completed successfully.", "data": data}
    return {"code": _failure(task).code, "msg": "Playground task failed.", "data": data}


def _veo_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.SUCCESS:
        response = _veo_response(task, base_url)
        info: Json = {"resultUrls": response["resultUrls"], "resolution": response["resolution"]}
        if response["originUrls"]:
            info["originUrls"] = response["originUrls"]
        return {
            "code": 200,
            "msg": "Veo3.1 video generated successfully.",
            "data": {
                "taskId": task.task_id,
                "promptJson": task.param_json,
                "info": info,
                "fallbackFlag": False,
            },
        }
    failure = _failure(task)
    return {
        "code": failure.code,
        "msg": failure.msg,
        "data": {"taskId": task.task_id, "fallbackFlag": False},
    }


def _runway_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.SUCCESS:
        video = _runway_status(task, 1.0, base_url)["videoInfo"]
        return {
            "code": 200,
            "msg": "All generated successfully.",
            "data": {
                "task_id": task.task_id,
                "video_id": video["videoId"],
                "video_url": video["videoUrl"],
                "image_url": video["imageUrl"],
            },
        }
    failure = _failure(task)
    return {
        "code": failure.code,
        "msg": failure.msg,
        "data": {"task_id": task.task_id, "video_id": "", "video_url": "", "image_url": ""},
    }


def _aleph_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.SUCCESS:
        return {
            "code": 200,
            "msg": "success",
            "data": {
                "result_video_url": _url(base_url, task, "0.mp4"),
                "result_image_url": _url(base_url, task, "0.png"),
            },
            "taskId": task.task_id,
        }
    failure = _failure(task)
    return {"code": failure.code, "msg": failure.msg, "data": None, "taskId": task.task_id}


def _suno_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.FAIL:
        failure = _failure(task)
        return {
            "code": failure.code,
            "msg": failure.msg,
            "data": {"callbackType": "error", "task_id": task.task_id, "data": None},
        }
    kind, msg, count = {
        Stage.TEXT: ("text", "Text generation completed.", 0),
        Stage.FIRST: ("first", "First track generated successfully.", 1),
        Stage.SUCCESS: ("complete", "All generated successfully.", 2),
    }[stage]
    return {
        "code": 200,
        "msg": msg,
        "data": {
            "callbackType": kind,
            "task_id": task.task_id,
            "data": [_track(task, n, base_url, camel=False) for n in range(count)],
        },
    }


def _gpt4o_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.SUCCESS:
        return {
            "code": 200,
            "msg": "success",
            "data": {
                "taskId": task.task_id,
                "info": {"result_urls": [_url(base_url, task, "0.png")]},
            },
        }
    failure = _failure(task)
    return {
        "code": failure.code,
        "msg": failure.msg,
        "data": {"taskId": task.task_id, "info": None},
    }


def _flux_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    if stage is Stage.SUCCESS:
        return {
            "code": 200,
            "msg": "BFL image generated successfully.",
            "data": {
                "taskId": task.task_id,
                "info": {
                    "originImageUrl": _url(base_url, task, "0.origin.jpg"),
                    "resultImageUrl": _url(base_url, task, "0.jpg"),
                },
            },
        }
    failure = _failure(task)
    return {
        "code": failure.code,
        "msg": failure.msg,
        "data": {"taskId": task.task_id, "info": {"originImageUrl": "", "resultImageUrl": ""}},
    }


def _mj_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    ok = stage is Stage.SUCCESS
    return {
        "code": 200 if ok else _failure(task).code,
        "msg": "success" if ok else _failure(task).msg,
        "data": {
            "taskId": task.task_id,
            "promptJson": task.param_json,
            "resultUrls": _mj_urls(task, base_url) if ok else [],
        },
    }


def _luma_callback(task: SimTask, stage: Stage, base_url: str) -> Json:
    ok = stage is Stage.SUCCESS
    return {
        "code": 200 if ok else _failure(task).code,
        "msg": "Modify record generated successfully." if ok else _failure(task).msg,
        "data": {
            "taskId": task.task_id,
            "promptJson": task.param_json,
            "resultUrls": [_url(base_url, task, "0.mp4")] if ok else [],
        },
    }


_CALLBACK: Final[Mapping[Family, Callable[[SimTask, Stage, str], Json]]] = {
    Family.MARKET: _market_callback,
    Family.VEO: _veo_callback,
    Family.RUNWAY: _runway_callback,
    Family.ALEPH: _aleph_callback,
    Family.SUNO: _suno_callback,
    Family.GPT4O: _gpt4o_callback,
    Family.FLUX_KONTEXT: _flux_callback,
    Family.MIDJOURNEY: _mj_callback,
    Family.LUMA: _luma_callback,
}


def callback_body(task: SimTask, stage: Stage, *, base_url: str) -> Json:
    """The callback KIE POSTs when ``task`` reaches ``stage`` (after the stage is applied)."""
    return _CALLBACK[task.family](task, stage, base_url)
