from __future__ import annotations

import json

import pytest

from kied.core import _extract
from kied.core.callbacks import (
    DEFAULT_LIMITS,
    CallbackOutcome,
    Outcome,
    ParseLimits,
    Unrecognised,
    parse_callback,
    result_to_json,
)
from kied.core.families import Family
from tests.conftest import FIXTURES

SAMPLES = FIXTURES / "callbacks"

P, S, X, U = Outcome.PENDING, Outcome.SUCCESS, Outcome.FAIL, Outcome.UNKNOWN
URL = "https://cdn.test/"


def parse(body: object, **kwargs) -> CallbackOutcome | Unrecognised:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_callback(raw, **kwargs)


def check(result: CallbackOutcome | Unrecognised, **expected: object) -> None:
    got = {name: getattr(result, name) for name in expected}
    assert got == expected


# -- the samples -----------------------------------------------------------------------


def _expected_rows() -> list[tuple[str, str, str]]:
    path = SAMPLES / "EXPECTED.tsv"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [tuple(line.split("\t")) for line in lines[1:] if line.strip()]
    return [(name, task_id, outcome) for name, task_id, outcome in rows]


EXPECTED_ROWS = _expected_rows()
OUTCOME_WORDS = {"success": S, "fail": X, "not-terminal": P, "unknown": U}


def test_the_samples_are_there():
    assert EXPECTED_ROWS, f"no samples at {SAMPLES}"
    listed = {name for name, _, _ in EXPECTED_ROWS}
    assert listed == {path.name for path in SAMPLES.glob("*.json")}


@pytest.mark.parametrize(("name", "task_id", "outcome"), EXPECTED_ROWS)
def test_sample(name, task_id, outcome):
    result = parse_callback((SAMPLES / name).read_bytes(), content_type="application/json")
    assert isinstance(result, CallbackOutcome)
    assert result.task_id == task_id
    assert result.outcome is OUTCOME_WORDS[outcome]


def test_samples_read_in_full():
    def read(name: str) -> CallbackOutcome | Unrecognised:
        return parse_callback((SAMPLES / name).read_bytes())

    tmp = "https://tempfile.example-cdn.test/"
    check(
        read("market-success.json"),
        found_by="data.taskId",
        family="market",
        kie_code=200,
        result_urls=(tmp + "images/3f9a1c7e_0.png",),
        error_code=None,
        error_message=None,
    )
    check(
        read("market-fail.json"),
        family="market",
        kie_code=501,
        result_urls=(),
        error_code="500",
        error_message="Internal server error",
    )
    check(
        read("veo-success.json"),
        family="veo",
        result_urls=(tmp + "v/veo_5d0e8f3a_0.mp4", tmp + "v/veo_5d0e8f3a_origin_0.mp4"),
    )
    fallback = read("veo-fallback-fail.json")
    check(fallback, family="veo", kie_code=422, error_code="422", result_urls=())
    assert fallback.error_message is not None
    assert fallback.error_message.startswith("Your request was rejected by Flow")
    check(read("runway-success.json"), found_by="data.task_id", family="runway")
    check(read("suno-text.json"), stage="text", family="suno", result_urls=())
    check(read("suno-complete.json"), stage="complete", family="suno")
    assert len(read("suno-complete.json").result_urls) == 6
    check(read("suno-error.json"), stage="error", error_code="531", kie_code=531)
    check(read("gpt4o-success.json"), family="4o")
    check(read("fluxkontext-fail.json"), family="flux-kontext", result_urls=(), error_code="501")
    check(read("mj-success.json"), family="mj")
    assert len(read("mj-success.json").result_urls) == 4
    check(read("aleph-success.json"), found_by="taskId", family="aleph")


# -- every family, success and failure ----------------------------------------------------

MARKET_OK = {
    "code": 200,
    "msg": "Playground task completed successfully.",
    "data": {
        "taskId": "mk1",
        "model": "google/nano-banana",
        "state": "success",
        "param": json.dumps(
            {
                "model": "google/nano-banana",
                "callBackUrl": "https://hooks.test/kie",
                "input": {"prompt": "cat", "image_urls": ["https://in.test/a.png"]},
                "taskId": "parent-task",
            }
        ),
        "resultJson": json.dumps({"resultUrls": [URL + "a.png"]}),
        "failCode": None,
        "failMsg": None,
        "costTime": 8,
        "consumeCredits": 4,
        "remainedCredits": 100,
    },
}

FAMILY_CASES = [
    pytest.param(
        MARKET_OK,
        {
            "task_id": "mk1",
            "outcome": S,
            "family": "market",
            "result_urls": (URL + "a.png",),
            "error_code": None,
        },
        id="market-success",
    ),
    pytest.param(
        {
            "code": 501,
            "msg": "Playground task failed.",
            "data": {
                "taskId": "mk1",
                "state": "fail",
                "resultJson": None,
                "failCode": "GENERATION_FAILED",
                "failMsg": "Internal server error",
            },
        },
        {
            "outcome": X,
            "family": "market",
            "error_code": "GENERATION_FAILED",
            "error_message": "Internal server error",
            "kie_code": 501,
        },
        id="market-fail",
    ),
    pytest.param(
        {
            "code": 501,
            "message": "Playground task failed.",
            "data": {"taskId": "mk1", "state": "fail", "resultJson": None},
        },
        {"outcome": X, "error_code": "501", "error_message": "Playground task failed."},
        id="market-message-not-msg",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "ok",
            "data": {
                "taskId": "mk1",
                "state": "success",
                "resultJson": json.dumps(
                    {
                        "resultUrls": [URL + "v.mp4"],
                        "resultWaterMarkUrls": [URL + "w.mp4"],
                        "firstFrameUrl": URL + "first.png",
                        "lastFrameUrl": URL + "last.png",
                        "resultObject": {"audio": {"url": URL + "o.mp3"}, "n": 1},
                    }
                ),
            },
        },
        {
            "outcome": S,
            "result_urls": (
                URL + "v.mp4",
                URL + "w.mp4",
                URL + "first.png",
                URL + "last.png",
                URL + "o.mp3",
            ),
        },
        id="market-every-result-key",
    ),
    *[
        pytest.param(
            {"code": 200, "data": {"taskId": "mk1", "state": state, "resultJson": None}},
            {"outcome": P, "family": "market"},
            id=f"market-{state}",
        )
        for state in ("waiting", "queuing", "generating")
    ],
    pytest.param(
        {"code": 200, "data": {"taskId": "mk1", "model": "kling-2.6", "state": "queuing"}},
        {"outcome": P, "family": "market"},
        id="market-without-result-json",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "Veo3.1 video generated successfully.",
            "data": {
                "taskId": "veo_1",
                "promptJson": {"prompt": "x", "imageUrls": ["https://in.test/ref.png"]},
                "info": {
                    "resultUrls": [URL + "v.mp4"],
                    "originUrls": [URL + "o.mp4"],
                    "resolution": "1080p",
                },
                "fallbackFlag": False,
            },
        },
        {
            "task_id": "veo_1",
            "outcome": S,
            "family": "veo",
            "result_urls": (URL + "v.mp4", URL + "o.mp4"),
        },
        id="veo-success-prompt-json-object",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {"taskId": "veo_1", "info": {"resultUrls": "[http://example.com/video1.mp4]"}},
        },
        {"outcome": S, "family": "veo", "result_urls": ("http://example.com/video1.mp4",)},
        id="veo-result-urls-as-non-json-text",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "taskId": "veo_1",
                "info": {"resultUrls": "[http://a.test/1.mp4, https://a.test/2.mp4]"},
            },
        },
        {"result_urls": ("http://a.test/1.mp4", "https://a.test/2.mp4")},
        id="veo-result-urls-text-with-two",
    ),
    pytest.param(
        {"code": 200, "data": {"taskId": "veo_1", "info": {"resultUrls": f'["{URL}v.mp4"]'}}},
        {"result_urls": (URL + "v.mp4",)},
        id="veo-result-urls-as-json-text",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "taskId": "veo_1",
                "info": {"resultUrls": [URL + "4k.mp4"], "imageUrls": [URL + "4k.png"]},
            },
        },
        {"outcome": S, "family": "veo", "result_urls": (URL + "4k.mp4", URL + "4k.png")},
        id="veo-4k",
    ),
    *[
        pytest.param(
            {
                "code": code,
                "msg": "reason",
                "data": {"taskId": "veo_1", "fallbackFlag": False},
            },
            {
                "outcome": X,
                "family": "veo",
                "error_code": str(code),
                "error_message": "reason",
            },
            id=f"veo-fail-{code}",
        )
        for code in (400, 422, 500, 501)
    ],
    pytest.param(
        {
            "code": 200,
            "msg": "All generated successfully.",
            "data": {
                "task_id": "rw1",
                "video_id": "v1",
                "video_url": URL + "r.mp4",
                "image_url": URL + "r.png",
            },
        },
        {
            "task_id": "rw1",
            "found_by": "data.task_id",
            "outcome": S,
            "family": "runway",
            "result_urls": (URL + "r.mp4", URL + "r.png"),
        },
        id="runway-success",
    ),
    pytest.param(
        {
            "code": 400,
            "msg": "Inappropriate content detected.",
            "data": {"task_id": "rw1", "video_id": "", "video_url": "", "image_url": ""},
        },
        {"outcome": X, "family": "runway", "result_urls": (), "error_code": "400"},
        id="runway-fail-empty-strings",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "success",
            "data": {"result_video_url": URL + "al.mp4", "result_image_url": URL + "al.png"},
            "taskId": "al1",
        },
        {
            "task_id": "al1",
            "found_by": "taskId",
            "outcome": S,
            "family": "aleph",
            "result_urls": (URL + "al.mp4", URL + "al.png"),
        },
        id="aleph-success-root-task-id",
    ),
    pytest.param(
        {"code": 400, "msg": "bad video", "data": None, "taskId": "al1"},
        {
            "task_id": "al1",
            "outcome": X,
            "family": "aleph",
            "error_code": "400",
            "error_message": "bad video",
        },
        id="aleph-fail-data-null",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "success",
            "data": {"task_id": "al1", "video_url": URL + "al.mp4", "image_url": URL + "al.png"},
        },
        {
            "task_id": "al1",
            "found_by": "data.task_id",
            "outcome": S,
            "result_urls": (URL + "al.mp4", URL + "al.png"),
        },
        id="aleph-handler-spelling",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "Text generation completed.",
            "data": {"callbackType": "text", "task_id": "su1", "data": []},
        },
        {"outcome": P, "stage": "text", "family": "suno", "result_urls": ()},
        id="suno-text",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "First track done.",
            "data": {
                "callbackType": "first",
                "task_id": "su1",
                "data": [{"id": "t1", "audio_url": URL + "1.mp3", "duration": 180.2}],
            },
        },
        {"task_id": "su1", "outcome": P, "stage": "first", "result_urls": (URL + "1.mp3",)},
        id="suno-first",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "callbackType": "complete",
                "task_id": "su1",
                "data": [
                    {
                        "id": "t1",
                        "image_url": URL + "1.jpg",
                        "stream_audio_url": URL + "1.stream",
                        "audio_url": URL + "1.mp3",
                    },
                    {"id": "t2", "audio_url": URL + "2.mp3"},
                ],
            },
        },
        {
            "task_id": "su1",
            "outcome": S,
            "stage": "complete",
            "family": "suno",
            "result_urls": (URL + "1.mp3", URL + "1.stream", URL + "1.jpg", URL + "2.mp3"),
        },
        id="suno-complete-audio-first",
    ),
    *[
        pytest.param(
            {
                "code": code,
                "msg": "generation failed",
                "data": {"callbackType": "error", "task_id": "su1", "data": data},
            },
            {"outcome": X, "stage": "error", "error_code": str(code), "family": "suno"},
            id=f"suno-error-{code}",
        )
        for code, data in ((400, None), (408, []), (413, None), (500, None), (531, None))
    ],
    pytest.param(
        {"code": 200, "data": {"callbackType": "error", "task_id": "su1", "data": None}},
        {"outcome": X, "stage": "error"},
        id="suno-error-with-code-200",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "All generated successfully.",
            "data": {
                "callbackType": "complete",
                "task_id": "ly1",
                "data": [{"text": "[Verse] la la", "title": "La", "status": "complete"}],
            },
        },
        {"outcome": S, "family": "suno-lyrics", "result_urls": ()},
        id="suno-lyrics",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "success",
            "data": {"images": [URL + "c1.png", URL + "c2.png"], "taskId": "cv1"},
        },
        {
            "task_id": "cv1",
            "found_by": "data.taskId",
            "outcome": S,
            "family": "suno-cover",
            "result_urls": (URL + "c1.png", URL + "c2.png"),
        },
        id="suno-cover-success",
    ),
    pytest.param(
        {"code": 501, "msg": "cover failed", "data": {"taskId": "cv1", "images": None}},
        {"outcome": X, "family": "suno-cover", "result_urls": ()},
        id="suno-cover-fail",
    ),
    pytest.param(
        {"code": 200, "data": {"task_id": "wv1", "audio_wav_url": URL + "a.wav"}},
        {"outcome": S, "family": "suno-wav", "result_urls": (URL + "a.wav",)},
        id="suno-wav-success",
    ),
    pytest.param(
        {"code": 501, "msg": "no", "data": {"task_id": "wv1", "audio_wav_url": None}},
        {"outcome": X, "family": "suno-wav", "result_urls": ()},
        id="suno-wav-fail",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "task_id": "vr1",
                "vocal_removal_info": {
                    "instrumental_url": URL + "inst.mp3",
                    "origin_url": "",
                    "vocal_url": URL + "voc.mp3",
                    "drums_url": URL + "drums.mp3",
                },
            },
        },
        {
            "outcome": S,
            "family": "suno-vocal-removal",
            "result_urls": (URL + "inst.mp3", URL + "voc.mp3", URL + "drums.mp3"),
        },
        id="suno-vocal-removal-success",
    ),
    pytest.param(
        {"code": 501, "data": {"task_id": "vr1", "vocal_removal_info": None}},
        {"outcome": X, "family": "suno-vocal-removal"},
        id="suno-vocal-removal-fail",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "success",
            "data": {
                "taskId": "md1",
                "state": "complete",
                "instruments": [
                    {"name": "Drums", "notes": [{"pitch": 73, "start": "0.03", "end": 0.1}]}
                ],
            },
        },
        {"task_id": "md1", "outcome": S, "family": "suno-midi", "result_urls": ()},
        id="suno-midi-success",
    ),
    pytest.param(
        {"code": 500, "msg": "MIDI generation failed", "data": {"taskId": "md1"}},
        {"outcome": X, "error_message": "MIDI generation failed"},
        id="suno-midi-fail",
    ),
    pytest.param(
        {"code": 200, "msg": "ok", "data": {"task_id": "mp1", "video_url": URL + "s.mp4"}},
        {"task_id": "mp1", "outcome": S, "result_urls": (URL + "s.mp4",)},
        id="suno-mp4-success",
    ),
    pytest.param(
        {"code": 451, "msg": "fetch failed", "data": {"task_id": "mp1", "video_url": None}},
        {"outcome": X, "result_urls": (), "error_code": "451"},
        id="suno-mp4-fail",
    ),
    pytest.param(
        {"code": 200, "data": {"taskId": "4o_1", "info": {"result_urls": [URL + "4o.png"]}}},
        {"task_id": "4o_1", "outcome": S, "family": "4o", "result_urls": (URL + "4o.png",)},
        id="4o-success",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {"taskId": "4o_1", "resultUrls": [URL + "4o.png"], "progress": "1.00"},
        },
        {"outcome": S, "family": "4o", "result_urls": (URL + "4o.png",)},
        id="4o-camel-result-urls",
    ),
    pytest.param(
        {"code": 400, "msg": "policy", "data": {"taskId": "4o_1", "info": None}},
        {"outcome": X, "error_code": "400", "error_message": "policy"},
        id="4o-fail",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "BFL image generated successfully.",
            "data": {
                "taskId": "fk1",
                "info": {"originImageUrl": URL + "o.jpg", "resultImageUrl": URL + "r.jpg"},
            },
        },
        {"outcome": S, "family": "flux-kontext", "result_urls": (URL + "r.jpg", URL + "o.jpg")},
        id="flux-success-result-before-origin",
    ),
    pytest.param(
        {
            "code": 501,
            "msg": "failed",
            "data": {"taskId": "fk1", "info": {"originImageUrl": "", "resultImageUrl": ""}},
        },
        {"outcome": X, "family": "flux-kontext", "result_urls": ()},
        id="flux-fail",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "taskId": "mj_1",
                "promptJson": json.dumps({"prompt": "x", "taskType": "mj_txt2img"}),
                "resultUrls": [URL + "m0.jpeg", URL + "m1.jpeg"],
            },
        },
        {"outcome": S, "family": "mj", "result_urls": (URL + "m0.jpeg", URL + "m1.jpeg")},
        id="mj-success",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "taskId": "mj_1",
                "resultUrls": [{"resultUrl": URL + "m0.jpeg"}, {"resultUrl": URL + "m1.jpeg"}],
            },
        },
        {"outcome": S, "family": "mj", "result_urls": (URL + "m0.jpeg", URL + "m1.jpeg")},
        id="mj-object-urls",
    ),
    pytest.param(
        {
            "code": 200,
            "data": {
                "taskId": "mj_1",
                "promptJson": json.dumps({"taskType": "mj_upscale", "taskId": "mj_parent"}),
                "resultUrls": [URL + "up.jpeg"],
            },
        },
        {"task_id": "mj_1", "family": "mj"},
        id="mj-parent-task-id-in-echo-is-ignored",
    ),
    pytest.param(
        {"code": 500, "msg": "failed", "data": {"taskId": "mj_1", "resultUrls": []}},
        {"outcome": X, "result_urls": ()},
        id="mj-fail",
    ),
    pytest.param(
        {
            "code": 200,
            "msg": "Modify record generated successfully.",
            "data": {
                "taskId": "lu1",
                "promptJson": json.dumps({"prompt": "x", "videoUrl": "https://in.test/in.mp4"}),
                "resultUrls": [URL + "l.mp4"],
            },
        },
        {"outcome": S, "family": "luma", "result_urls": (URL + "l.mp4",)},
        id="luma-success",
    ),
    pytest.param(
        {"code": 500, "msg": "failed", "data": {"taskId": "lu1"}},
        {"outcome": X, "error_code": "500"},
        id="luma-fail",
    ),
]


@pytest.mark.parametrize(("body", "expected"), FAMILY_CASES)
def test_family_variant(body, expected):
    result = parse(body)
    assert isinstance(result, CallbackOutcome)
    check(result, **expected)


def test_request_echo_urls_are_not_results():
    result = parse(MARKET_OK)
    assert result.result_urls == (URL + "a.png",)
    assert result.task_id == "mk1"


# -- where the task id is -----------------------------------------------------------------

ID_CASES = [
    pytest.param({"data": {"taskId": "a"}}, "a", "data.taskId", id="data.taskId"),
    pytest.param({"data": {"task_id": "a"}}, "a", "data.task_id", id="data.task_id"),
    pytest.param({"taskId": "a", "data": {}}, "a", "taskId", id="root-taskId"),
    pytest.param({"task_id": "a"}, "a", "task_id", id="root-task_id"),
    pytest.param({"data": {"recordId": "a"}}, "a", "data.recordId", id="recordId"),
    pytest.param({"data": {"TaskID": "a"}}, "a", "data.TaskID", id="any-key-case"),
    pytest.param({"payload": {"data": {"taskId": "a"}}}, "a", "payload.data.taskId", id="payload"),
    pytest.param({"data": {"data": {"taskId": "a"}}}, "a", "data.data.taskId", id="data-data"),
    pytest.param([{"data": {"taskId": "a"}}], "a", "[0].data.taskId", id="body-is-a-list"),
    pytest.param({"data": [{"taskId": "a"}]}, "a", "data[0].taskId", id="data-is-a-list"),
    pytest.param(
        [{"data": {"taskId": "a"}}, {"data": {"taskId": "b"}}], "a", "[0].data.taskId", id="first"
    ),
    pytest.param(
        {"data": json.dumps({"taskId": "a"})}, "a", "data(json).taskId", id="data-as-json-text"
    ),
    pytest.param(
        {"data": json.dumps(json.dumps({"taskId": "a"}))},
        None,
        None,
        id="data-as-json-text-twice-is-not-an-object",
    ),
    pytest.param({"data": {"taskId": 12345}}, "12345", "data.taskId", id="numeric-id"),
    pytest.param({"data": {"taskId": 12345.0}}, "12345", "data.taskId", id="float-id"),
    pytest.param({"data": {"taskId": "  a  "}}, "a", "data.taskId", id="stripped"),
    pytest.param(
        {"data": {"taskId": True, "task_id": "a"}}, "a", "data.task_id", id="bool-is-not-an-id"
    ),
    pytest.param(
        {"data": {"taskId": "", "task_id": "a"}}, "a", "data.task_id", id="empty-is-not-an-id"
    ),
    pytest.param({"data": {"taskId": "x" * 201, "recordId": "a"}}, "a", "data.recordId", id="long"),
    pytest.param({"data": {"taskId": "x" * 200}}, "x" * 200, "data.taskId", id="200-chars-is-ok"),
    pytest.param({"data": {"taskId": "a\x00b", "task_id": "a"}}, "a", "data.task_id", id="nul"),
    pytest.param({"data": {"taskId": "a\nb", "task_id": "a"}}, "a", "data.task_id", id="newline"),
    pytest.param({"data": {"taskId": "a b", "task_id": "a"}}, "a", "data.task_id", id="space"),
    pytest.param({"data": {"taskId": 1.5, "task_id": "a"}}, "a", "data.task_id", id="fraction"),
    pytest.param({"data": {"taskId": ["a"], "task_id": "b"}}, "b", "data.task_id", id="list"),
    pytest.param({"data": {"taskId": {"id": "a"}}}, "a", "data.taskId.id", id="object-id-inside"),
    pytest.param(
        {"taskId": "shallow", "data": {"taskId": "deep"}}, "shallow", "taskId", id="shallow-wins"
    ),
    pytest.param(
        {"data": {"recordId": "r", "taskId": "t"}}, "t", "data.taskId", id="taskId-before-recordId"
    ),
    pytest.param({"id": "g"}, "g", "id", id="generic-id-last-resort"),
    pytest.param({"data": {"id": "g"}}, "g", "data.id", id="generic-data-id"),
    pytest.param(
        {"id": "g", "data": {"data": {"taskId": "t"}}}, "t", "data.data.taskId", id="id-last"
    ),
    pytest.param(
        {"code": 200, "data": {"callbackType": "complete", "data": [{"id": "track"}]}},
        None,
        None,
        id="suno-track-ids-are-not-the-task",
    ),
    pytest.param(
        {"data": {"param": json.dumps({"taskId": "parent"})}}, None, None, id="echo-is-not-searched"
    ),
    pytest.param(
        {"data": {"resultJson": json.dumps({"resultObject": {"taskId": "x"}})}},
        None,
        None,
        id="results-are-not-searched",
    ),
]


@pytest.mark.parametrize(("body", "task_id", "found_by"), ID_CASES)
def test_task_id(body, task_id, found_by):
    result = parse(body)
    if task_id is None:
        assert isinstance(result, Unrecognised)
        assert result.reason == "no task id"
    else:
        assert isinstance(result, CallbackOutcome)
        assert (result.task_id, result.found_by) == (task_id, found_by)


def test_whole_body_as_a_json_string():
    envelope = {"code": 200, "data": {"taskId": "a", "state": "success"}}
    once = json.dumps(json.dumps(envelope)).encode()
    check(parse(once), task_id="a", found_by="(json).data.taskId", outcome=S)
    twice = json.dumps(json.dumps(json.dumps(envelope))).encode()
    check(parse(twice), task_id="a", found_by="(json).data.taskId")


@pytest.mark.parametrize("key", ["taskId", "task_id", "TASKID", "TaskId"])
def test_query_id(key):
    result = parse(b"", query={"token": "t", key: " q1 "})
    check(result, task_id="q1", found_by=f"query:{key}", outcome=U)


@pytest.mark.parametrize(
    "key", ["X-Task-Id", "x-task-id", "X-TASK-ID", "x_task_id", "X-Kie-Task-Id"]
)
def test_header_id(key):
    canonical = "-".join(part.capitalize() for part in key.split("-"))
    result = parse({"code": 200}, headers={"Content-Type": "application/json", key: "h1"})
    check(result, task_id="h1", found_by=f"header:{canonical}", outcome=S)


def test_id_precedence_body_then_query_then_header_then_generic_id():
    body = {"id": "generic", "data": {"taskId": "body"}}
    query = {"taskId": "query"}
    headers = {"X-Task-Id": "header"}
    assert parse(body, query=query, headers=headers).task_id == "body"
    assert parse({"id": "generic"}, query=query, headers=headers).task_id == "query"
    assert parse({"id": "generic"}, headers=headers).task_id == "header"
    assert parse({"id": "generic"}, query={"id": "job-id"}).task_id == "generic"


def test_absurd_query_and_header_ids_are_skipped():
    result = parse(b"{}", query={"taskId": "a\x01"}, headers={"X-Task-Id": " "})
    check(result, reason="no task id")


def test_side_ids_do_not_override_an_unreadable_body_reason():
    result = parse(b"not json")
    check(result, reason="invalid JSON")
    check(parse(b"not json", query={"taskId": "q"}), task_id="q", outcome=U)


# -- form-encoded bodies ------------------------------------------------------------------


def test_form_encoded_with_content_type():
    result = parse_callback(
        b"taskId=f1&code=200&msg=ok",
        content_type="application/x-www-form-urlencoded; charset=utf-8",
    )
    check(result, task_id="f1", found_by="form:taskId", outcome=S, kie_code=200)


def test_form_encoded_without_content_type():
    result = parse_callback(b"code=501&task_id=f2&msg=bad+things")
    check(result, task_id="f2", outcome=X, error_code="501", error_message="bad things")


def test_form_field_holding_json():
    body = b"payload=" + json.dumps({"code": 200, "data": {"taskId": "f3"}}).encode().replace(
        b" ", b"+"
    )
    check(parse_callback(body), task_id="f3", found_by="form:payload(json).data.taskId")


def test_form_content_type_with_a_json_body():
    body = json.dumps({"data": {"taskId": "j1"}}).encode()
    result = parse_callback(body, content_type="application/x-www-form-urlencoded")
    check(result, task_id="j1", found_by="data.taskId")


def test_form_without_id():
    check(parse_callback(b"a=b&c=d"), reason="no task id")


def test_form_fields_are_bounded():
    body = b"&".join(b"k%d=v" % i for i in range(50)) + b"&taskId=late"
    assert parse_callback(body, limits=ParseLimits(max_nodes=10)).outcome is U
    assert isinstance(parse_callback(body, limits=ParseLimits(max_nodes=10)), Unrecognised)
    check(parse_callback(body), task_id="late")


# -- outcomes -----------------------------------------------------------------------------

OUTCOME_CASES = [
    pytest.param({"code": 200}, S, id="code-200"),
    pytest.param({"code": "200"}, S, id="code-200-as-text"),
    pytest.param({"code": 501}, X, id="code-501"),
    pytest.param({"code": 501, "data": {"state": "success"}}, X, id="non-200-code-wins"),
    pytest.param({"code": 200, "data": {"state": "fail"}}, X, id="flag-beats-code-200"),
    pytest.param({"code": 200, "data": {"state": "generating"}}, P, id="pending-beats-code-200"),
    pytest.param({"data": {"state": "success"}}, S, id="flag-without-code"),
    pytest.param({"data": {"successFlag": 1}}, S, id="flag-1-any-family"),
    pytest.param({"data": {"successFlag": 0}}, P, id="flag-0-any-family"),
    pytest.param({"data": {"successFlag": 3}}, X, id="flag-3-any-family"),
    pytest.param({"data": {"successFlag": 2}}, U, id="flag-2-depends-on-family"),
    pytest.param({"code": 200, "data": {"successFlag": 2}}, U, id="flag-2-code-200"),
    pytest.param({"data": {"successFlag": 2, "fallbackFlag": False}}, X, id="veo-flag-2"),
    pytest.param({"data": {"successFlag": 2, "images": []}}, P, id="cover-flag-2"),
    pytest.param(
        {"data": {"successFlag": 4, "resultUrls": [URL + "a"], "promptJson": "{}"}}, S, id="luma-4"
    ),
    pytest.param(
        {"data": {"successFlag": 0, "response": {"resultVideoUrl": ""}, "errorMessage": "x"}},
        X,
        id="aleph-0-with-error",
    ),
    pytest.param(
        {"data": {"successFlag": 0, "response": {"resultVideoUrl": ""}, "errorCode": 0}},
        P,
        id="aleph-0-without-error",
    ),
    pytest.param({"data": {"status": "TEXT_SUCCESS", "sunoData": []}}, P, id="suno-status"),
    pytest.param({"data": {"status": "GENERATE_FAILED"}}, X, id="4o-status-any-family"),
    pytest.param(
        {
            "code": 200,
            "data": {"status": "CALLBACK_EXCEPTION", "response": {"sunoData": [{"audioUrl": URL}]}},
        },
        S,
        id="callback-exception-with-audio",
    ),
    pytest.param(
        {"code": 200, "data": {"status": "CALLBACK_EXCEPTION", "response": {"sunoData": []}}},
        U,
        id="callback-exception-without-audio",
    ),
    pytest.param({"code": 200, "data": {"state": "mystery"}}, U, id="unmapped-state"),
    pytest.param({"data": {"failMsg": "boom"}}, X, id="error-alone"),
    pytest.param({"data": {"errorCode": 0, "errorMessage": ""}}, U, id="empty-error"),
    pytest.param({"data": {}}, U, id="nothing-tells"),
    pytest.param({"code": 200, "data": {"callbackType": "mystery"}}, S, id="unknown-stage"),
    pytest.param({"code": 200, "data": {"callbackType": "TEXT"}}, P, id="stage-case"),
    pytest.param({"code": 200, "data": {"callbackType": "first"}}, P, id="suno-first"),
    pytest.param({"code": 531, "data": {"callbackType": "first"}}, X, id="suno-first-non-200"),
    pytest.param({"code": True}, U, id="bool-code-is-no-code"),
    pytest.param({"code": 10**30}, U, id="absurd-code-is-no-code"),
    pytest.param({"code": 200.0}, S, id="float-code"),
]


@pytest.mark.parametrize(("body", "outcome"), OUTCOME_CASES)
def test_outcome(body, outcome):
    assert parse(body).outcome is outcome


def test_outcome_of_an_unrecognised_body_is_still_read():
    result = parse({"code": 501, "msg": "nope", "data": {"failMsg": "boom", "resultJson": None}})
    assert isinstance(result, Unrecognised)
    check(
        result,
        reason="no task id",
        outcome=X,
        kie_code=501,
        error_code="501",
        error_message="boom",
    )


def test_the_nearest_envelope_wins():
    body = {
        "code": 200,
        "msg": "relayed",
        "data": {"code": 501, "msg": "no", "data": {"taskId": "a"}},
    }
    check(parse(body), outcome=X, kie_code=501, error_message="no")


def test_error_fields():
    check(
        parse({"code": 501, "msg": "env", "data": {"taskId": "a", "failCode": 500}}),
        error_code="500",
        error_message="env",
    )
    check(
        parse({"code": 500, "data": {"taskId": "a", "errorCode": 400, "errorMessage": "bad"}}),
        error_code="400",
        error_message="bad",
    )
    check(
        parse({"code": 200, "msg": "success", "data": {"taskId": "a", "failMsg": None}}),
        error_code=None,
        error_message=None,
    )


def test_error_values_that_are_not_text():
    body = b'{"code":500,"msg":1e999,"data":{"taskId":"a","failCode":' + b"9" * 400 + b"}}"
    check(parse_callback(body), error_code="500", error_message=None)
    check(
        parse({"code": 500, "data": {"taskId": "a", "failCode": 1.5, "failMsg": 42}}),
        error_code="1.5",
        error_message="42",
    )


def test_long_error_messages_are_cut():
    result = parse({"code": 500, "msg": "x" * 10_000, "data": {"taskId": "a"}})
    assert result.error_message is not None
    assert len(result.error_message) == 2000
    assert result.error_message.endswith("…")


# -- result URLs --------------------------------------------------------------------------


def test_urls_keep_order_drop_duplicates_empties_and_non_http():
    body = {
        "code": 200,
        "data": {
            "taskId": "a",
            "resultUrls": [
                URL + "1.png",
                "",
                "  ",
                URL + "1.png",
                "ftp://cdn.test/x",
                "javascript:alert(1)",
                "https://",
                None,
                7,
                URL + "2.png",
                "HTTP://CDN.TEST/3.png",
                URL + "bad\x00.png",
                URL + "spaced out.png",
                "see https://cdn.test/in-text.png",
            ],
        },
    }
    assert parse(body).result_urls == (URL + "1.png", URL + "2.png", "HTTP://CDN.TEST/3.png")


def test_absurd_urls_are_dropped():
    body = {
        "data": {
            "taskId": "a",
            "resultUrls": [URL + "x" * 9000, "[http://cdn.test/a\x00b, http://cdn.test/ok]"],
        }
    }
    assert parse(body).result_urls == ("http://cdn.test/ok",)


def test_callback_url_in_a_status_like_body_is_not_a_result():
    body = {"data": {"taskId": "a", "callbackUrl": "https://hooks.test/kie", "successFlag": 1}}
    assert parse(body).result_urls == ()


# -- hostile input ------------------------------------------------------------------------


def test_invalid_utf8_inside_a_string():
    result = parse_callback(b'{"code":200,"msg":"\xff\xfe bad","data":{"taskId":"u1"}}')
    check(result, task_id="u1", outcome=S)


def test_invalid_utf8_everywhere():
    check(parse_callback(b"\x80\x81\x82\xc3\x28{"), reason="invalid JSON")


def test_utf8_bom():
    body = b"\xef\xbb\xbf" + json.dumps({"code": 200, "data": {"taskId": "b1"}}).encode()
    check(parse_callback(body), task_id="b1", outcome=S)


def test_utf16_body():
    body = json.dumps({"code": 200, "data": {"taskId": "w1"}}).encode("utf-16")
    check(parse_callback(body), task_id="w1")


def test_nan_and_infinity():
    body = b'{"code": NaN, "data": {"taskId": "n1", "successFlag": Infinity, "x": -Infinity}}'
    check(parse_callback(body), task_id="n1", kie_code=None, outcome=U)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
    ids=["arrays", "objects"],
)
def test_100k_deep_nesting(body):
    result = parse_callback(body)
    check(result, reason="too deeply nested", outcome=U)


def test_deep_but_parseable_nesting_is_examined_only_to_max_depth():
    deep = {
        "code": 200,
        "data": {"taskId": "top"},
        "x": json.loads('{"a":' * 500 + "1" + "}" * 500),
    }
    check(parse(deep), task_id="top", outcome=S)
    buried: object = {"taskId": "deep"}
    for _ in range(70):
        buried = {"a": buried}
    assert isinstance(parse(buried), Unrecognised)
    assert parse(buried, limits=ParseLimits(max_depth=100)).task_id == "deep"


def test_oversized_body_is_not_parsed():
    body = json.dumps({"data": {"taskId": "big"}, "pad": ""}).encode()
    pad = DEFAULT_LIMITS.max_bytes + 1 - len(body)
    oversized = body.replace(b'"pad": ""', b'"pad": "' + b"x" * pad + b'"')
    assert len(oversized) == (1 << 20) + 1
    check(parse_callback(oversized, query={"taskId": "q"}), reason="oversized", outcome=U)
    exactly = oversized.replace(b"x", b"", 1)
    check(parse_callback(exactly), task_id="big")


@pytest.mark.parametrize(
    "body", [b"null", b"123", b"true", b"1.5e3", b'"just text"', b'"{not json"', b"NaN"]
)
def test_non_object_json(body):
    check(parse_callback(body), reason="not a JSON object", outcome=U)


def test_empty_containers_have_no_task_id():
    check(parse_callback(b"{}"), reason="no task id")
    check(parse_callback(b"[]"), reason="no task id")


@pytest.mark.parametrize("body", [b"", b"   \r\n\t", b"\xef\xbb\xbf"])
def test_empty_body(body):
    check(parse_callback(body), reason="empty body", outcome=U)


def test_lone_surrogates():
    # An id holding one is absurd; a message keeps the rest; a URL holding one is dropped.
    body = (
        b'{"code":500,"msg":"bad \\udfff thing","data":{"taskId":"\\ud800x","task_id":"ok",'
        b'"resultUrls":["https://cdn.test/\\ud800.png","https://cdn.test/fine.png"]}}'
    )
    result = parse_callback(body)
    check(result, task_id="ok", error_message="bad ? thing", result_urls=(URL + "fine.png",))
    json.dumps(result_to_json(result)).encode("utf-8")


def test_huge_integers():
    body = b'{"code":' + b"9" * 5000 + b',"data":{"taskId":' + b"7" * 5000 + b',"task_id":"ok"}}'
    check(parse_callback(body), task_id="ok", kie_code=None)
    body = b'{"code":' + b"9" * 40 + b',"data":{"taskId":' + b"7" * 300 + b"}}"
    check(parse_callback(body), reason="no task id", kie_code=None)


def test_trailing_garbage_is_invalid():
    check(parse_callback(b'{"data":{"taskId":"a"}} trailing'), reason="invalid JSON")


def test_parser_never_raises_even_on_a_broken_mapping():
    class Broken(dict):
        def items(self):
            raise RuntimeError("boom")

    result = parse_callback(b"{}", headers=Broken(a="b"))
    check(result, reason="parser error: RuntimeError", outcome=U)


def test_non_string_side_values_are_ignored():
    result = parse_callback(b"{}", query={"taskId": 5}, headers={7: "x"})  # type: ignore[dict-item]
    check(result, reason="no task id")


# -- limits -------------------------------------------------------------------------------


def test_max_embedded_bounds_json_in_strings():
    body = {"data": json.dumps({"taskId": "a"})}
    assert isinstance(parse(body, limits=ParseLimits(max_embedded=0)), Unrecognised)
    assert parse(body, limits=ParseLimits(max_embedded=1)).task_id == "a"


def test_max_nodes_bounds_the_walk():
    body = {"pad": list(range(100)), "data": {"taskId": "a"}}
    assert isinstance(parse(body, limits=ParseLimits(max_nodes=50)), Unrecognised)
    # Breadth first: a shallow id is found even when a wide sibling exhausts the budget.
    body = {"data": {"taskId": "a"}, "pad": list(range(100_000))}
    assert parse(body, limits=ParseLimits(max_nodes=50)).task_id == "a"


def test_the_walk_reports_its_work():
    wide = {"a": list(range(100_000))}
    found = _extract.scan(wide, max_nodes=1000)
    assert (found.visited, found.exhausted) == (1000, True)
    small = _extract.scan({"a": [1, 2]})
    assert (small.visited, small.exhausted) == (4, False)


def test_url_harvest_counts_against_the_budget():
    urls = [f"http://cdn.test/{n}" for n in range(10)]
    found = _extract.scan({"resultUrls": urls}, max_nodes=6)
    assert found.urls == ("http://cdn.test/0", "http://cdn.test/1")
    assert (found.visited, found.exhausted) == (6, True)
    stems = {"vocal_url": urls[0], "drums_url": urls[1]}
    assert _extract.scan({"vocal_removal_info": stems}, max_nodes=4).urls == (urls[0],)
    text = "[" + ", ".join(urls) + "]"
    assert _extract.scan({"resultUrls": text}, max_nodes=5).urls == tuple(urls[:3])


def test_a_zero_budget_examines_nothing():
    found = _extract.scan({"data": {"taskId": "a"}}, max_nodes=0)
    assert (found.visited, found.containers, found.exhausted) == (0, 0, True)


def test_limits_are_frozen_with_the_documented_defaults():
    assert DEFAULT_LIMITS == ParseLimits(
        max_bytes=1 << 20, max_depth=64, max_nodes=20_000, max_embedded=4
    )


# -- result_to_json -----------------------------------------------------------------------


def test_result_to_json_for_a_match():
    result = parse(
        {"code": 501, "msg": "no", "data": {"taskId": "a", "state": "fail", "resultJson": None}}
    )
    assert result_to_json(result) == {
        "task_id": "a",
        "found_by": "data.taskId",
        "outcome": "fail",
        "result_urls": [],
        "error": {"code": "501", "message": "no"},
        "kie_code": 501,
        "stage": None,
        "family": "market",
    }


def test_result_to_json_for_an_unrecognised_body():
    out = result_to_json(parse_callback(b"nope"))
    assert out == {
        "task_id": None,
        "found_by": None,
        "outcome": "unknown",
        "result_urls": [],
        "error": None,
        "kie_code": None,
        "stage": None,
        "family": None,
        "reason": "invalid JSON",
    }
    json.dumps(out)


def test_family_values_are_family_names():
    for param in FAMILY_CASES:
        family = parse(param.values[0]).family
        assert family is None or family in {f.value for f in Family}


def test_nul_characters_are_dropped_from_messages():
    body = (
        b'{"code":501,"msg":"bad\\u0000","data":{"taskId":"t-nul","state":"fail",'
        b'"failCode":"5\\u000000","failMsg":"broken\\u0000 input"}}'
    )
    parsed = parse_callback(body)
    assert parsed.task_id == "t-nul"
    assert parsed.outcome.value == "fail"
    assert parsed.error_code == "500"
    assert parsed.error_message == "broken input"
