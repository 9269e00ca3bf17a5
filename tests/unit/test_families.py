from __future__ import annotations

import pytest

from kied.core.callbacks import Outcome
from kied.core.families import SPECS, Family, FamilySpec, StatusReading, read_status

F = Family
P, S, X, U = Outcome.PENDING, Outcome.SUCCESS, Outcome.FAIL, Outcome.UNKNOWN

NUMBERED = (F.VEO, F.MJ, F.FLUX_KONTEXT, F.SUNO_MIDI)
SUNO_STYLE = (F.SUNO, F.SUNO_LYRICS, F.SUNO_WAV, F.SUNO_VOCAL)

# The normalisation table, one column per group of families, every row of it:
# (families, field, value, outcome).
TABLE = [
    # Market `state`
    *[((F.MARKET,), "state", v, P) for v in ("waiting", "queuing", "generating")],
    ((F.MARKET,), "state", "success", S),
    ((F.MARKET,), "state", "fail", X),
    *[((F.MARKET,), "state", v, U) for v in ("wait", "queueing", "done", "", 1)],
    # Runway `state` (spelt differently from Market's)
    *[((F.RUNWAY,), "state", v, P) for v in ("wait", "queueing", "generating")],
    ((F.RUNWAY,), "state", "success", S),
    ((F.RUNWAY,), "state", "fail", X),
    *[((F.RUNWAY,), "state", v, U) for v in ("waiting", "queuing", "done")],
    # Veo / MJ / Flux / MIDI `successFlag`
    (NUMBERED, "successFlag", 0, P),
    (NUMBERED, "successFlag", 1, S),
    (NUMBERED, "successFlag", 2, X),
    (NUMBERED, "successFlag", 3, X),
    *[(NUMBERED, "successFlag", v, U) for v in (4, -1, 99, "x")],
    # Luma `successFlag`: 4 means the generation worked and only the callback failed
    ((F.LUMA,), "successFlag", 0, P),
    ((F.LUMA,), "successFlag", 1, S),
    ((F.LUMA,), "successFlag", 4, S),
    ((F.LUMA,), "successFlag", 2, X),
    ((F.LUMA,), "successFlag", 3, X),
    *[((F.LUMA,), "successFlag", v, U) for v in (5, -1)],
    # Aleph `successFlag` (0 with an error is in test_aleph_zero_with_an_error_fails)
    ((F.ALEPH,), "successFlag", 0, P),
    ((F.ALEPH,), "successFlag", 1, S),
    ((F.ALEPH,), "successFlag", 2, U),
    # Suno-style `status`
    *[(SUNO_STYLE, "status", v, P) for v in ("PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS")],
    (SUNO_STYLE, "status", "SUCCESS", S),
    *[
        (SUNO_STYLE, "status", v, X)
        for v in (
            "CREATE_TASK_FAILED",
            "GENERATE_AUDIO_FAILED",
            "GENERATE_LYRICS_FAILED",
            "GENERATE_WAV_FAILED",
            "GENERATE_MP4_FAILED",
            "SENSITIVE_WORD_ERROR",
        )
    ],
    (SUNO_STYLE, "status", "CALLBACK_EXCEPTION", U),
    *[(SUNO_STYLE, "status", v, U) for v in ("GENERATING", "DONE", "GENERATE_FAILED")],
    # 4o `status`
    ((F.GPT4O,), "status", "GENERATING", P),
    ((F.GPT4O,), "status", "SUCCESS", S),
    ((F.GPT4O,), "status", "CREATE_TASK_FAILED", X),
    ((F.GPT4O,), "status", "GENERATE_FAILED", X),
    ((F.GPT4O,), "status", "PENDING", U),
    # Suno cover `successFlag`: 2 is *generating* here
    ((F.SUNO_COVER,), "successFlag", 0, P),
    ((F.SUNO_COVER,), "successFlag", 2, P),
    ((F.SUNO_COVER,), "successFlag", 1, S),
    ((F.SUNO_COVER,), "successFlag", 3, X),
    ((F.SUNO_COVER,), "successFlag", 4, U),
]

CASES = [
    pytest.param(family, field, value, expected, id=f"{family}-{field}-{value!r}")
    for families, field, value, expected in TABLE
    for family in families
]


@pytest.mark.parametrize(("family", "field", "value", "expected"), CASES)
def test_the_normalisation_table(family, field, value, expected):
    reading = read_status(family, {"taskId": "t1", field: value})
    assert reading.outcome is expected
    assert reading.kie_state == (str(value) if value != "" else None)


def test_every_family_has_a_row():
    assert {family for family, *_ in (c.values for c in CASES)} == set(Family)


@pytest.mark.parametrize("field", ["successFlag", "state", "status"])
@pytest.mark.parametrize("family", list(Family))
def test_a_missing_state_is_unknown(family, field):
    reading = read_status(family, {"taskId": "t1", "other": field})
    assert reading == StatusReading(
        outcome=U, kie_state=None, result_urls=(), error_code=None, error_message=None
    )


def test_flags_are_read_per_family_never_globally():
    assert read_status(F.VEO, {"successFlag": 2}).outcome is X
    assert read_status(F.SUNO_COVER, {"successFlag": 2}).outcome is P
    assert read_status(F.LUMA, {"successFlag": 4}).outcome is S
    assert read_status(F.MJ, {"successFlag": 4}).outcome is U
    # Market reads `state`, not `successFlag`, and Suno reads `status`.
    assert read_status(F.MARKET, {"successFlag": 1}).outcome is U
    assert read_status(F.SUNO, {"state": "success"}).outcome is U


@pytest.mark.parametrize("value", ["1", " 1 ", 1.0])
def test_flags_as_text_or_float(value):
    assert read_status(F.VEO, {"successFlag": value}).outcome is S


def test_state_case_does_not_matter():
    assert read_status(F.MARKET, {"state": "SUCCESS"}).outcome is S
    assert read_status(F.SUNO, {"status": "success"}).outcome is S


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"errorMessage": "content rejected"}, X),
        ({"errorCode": 400}, X),
        ({"errorCode": "400", "errorMessage": ""}, X),
        ({"errorCode": 0, "errorMessage": ""}, P),
        ({"errorCode": None, "errorMessage": None}, P),
    ],
)
def test_aleph_zero_with_an_error_fails(extra, expected):
    reading = read_status(F.ALEPH, {"taskId": "a1", "successFlag": 0, **extra})
    assert reading.outcome is expected


@pytest.mark.parametrize("family", SUNO_STYLE)
def test_callback_exception_is_success_only_with_results(family):
    bare = {"taskId": "s1", "status": "CALLBACK_EXCEPTION", "response": {"sunoData": []}}
    assert read_status(family, bare).outcome is U
    with_audio = {
        "taskId": "s1",
        "status": "CALLBACK_EXCEPTION",
        "response": {"sunoData": [{"audioUrl": "https://cdn.test/1.mp3"}]},
    }
    reading = read_status(family, with_audio)
    assert reading.outcome is S
    assert reading.result_urls == ("https://cdn.test/1.mp3",)


def test_4o_reads_status_first_then_success_flag():
    assert read_status(F.GPT4O, {"status": "SUCCESS", "successFlag": 2}).outcome is S
    assert read_status(F.GPT4O, {"successFlag": 0, "progress": "0.40"}).outcome is P
    assert read_status(F.GPT4O, {"successFlag": 1}).outcome is S
    assert read_status(F.GPT4O, {"successFlag": 2}).outcome is X


def test_cover_falls_back_to_the_documented_status_strings():
    assert read_status(F.SUNO_COVER, {"status": "GENERATE_COVER_FAILED"}).outcome is X


def test_midi_record_info_is_read_by_its_flag():
    data = {
        "taskId": "m1",
        "midiData": {"state": "complete", "instruments": [{"name": "Drums", "notes": []}]},
        "successFlag": 1,
        "errorCode": None,
        "errorMessage": None,
    }
    assert read_status(F.SUNO_MIDI, data) == StatusReading(
        outcome=S, kie_state="1", result_urls=(), error_code=None, error_message=None
    )


# -- results and errors, per family, in record-info shapes --------------------------------

URL = "https://cdn.test/"


def test_market_result_json_string():
    data = {
        "taskId": "m1",
        "model": "google/nano-banana",
        "state": "success",
        "param": '{"callBackUrl":"https://hooks.test/kie","input":{"image_urls":["https://in.test/a.png"]}}',
        "resultJson": (
            '{"resultUrls":["https://cdn.test/a.png"],"resultWaterMarkUrls":["https://cdn.test/w.png"],'
            '"firstFrameUrl":"https://cdn.test/f.png","lastFrameUrl":"https://cdn.test/l.png"}'
        ),
        "failCode": None,
        "failMsg": None,
    }
    reading = read_status(F.MARKET, data)
    assert reading == StatusReading(
        outcome=S,
        kie_state="success",
        result_urls=(URL + "a.png", URL + "w.png", URL + "f.png", URL + "l.png"),
        error_code=None,
        error_message=None,
    )


def test_market_failure():
    data = {
        "taskId": "m1",
        "state": "fail",
        "resultJson": None,
        "failCode": "GENERATION_FAILED",
        "failMsg": "Internal server error",
    }
    reading = read_status(F.MARKET, data)
    assert (reading.outcome, reading.error_code, reading.error_message) == (
        X,
        "GENERATION_FAILED",
        "Internal server error",
    )
    assert reading.result_urls == ()


def test_market_result_object():
    data = {
        "state": "success",
        "resultJson": '{"resultObject":{"video":{"url":"https://cdn.test/o.mp4"}}}',
    }
    assert read_status(F.MARKET, data).result_urls == (URL + "o.mp4",)


def test_veo_record_info():
    data = {
        "taskId": "veo_1",
        "paramJson": '{"prompt":"x","imageUrls":["https://in.test/i.png"]}',
        "response": {
            "taskId": "veo_1",
            "resultUrls": [URL + "v.mp4"],
            "originUrls": [URL + "o.mp4"],
            "fullResultUrls": [URL + "v.mp4"],
            "resolution": "1080p",
        },
        "successFlag": 1,
        "errorCode": None,
        "errorMessage": "",
    }
    assert read_status(F.VEO, data) == StatusReading(
        outcome=S,
        kie_state="1",
        result_urls=(URL + "v.mp4", URL + "o.mp4"),
        error_code=None,
        error_message=None,
    )


def test_veo_failure_detail():
    data = {"taskId": "veo_1", "successFlag": 3, "errorCode": 501, "errorMessage": "failed"}
    reading = read_status(F.VEO, data)
    assert (reading.outcome, reading.error_code, reading.error_message) == (X, "501", "failed")


def test_runway_record_detail():
    data = {
        "taskId": "r1",
        "generateParam": {"prompt": "cat", "imageUrl": "https://in.test/cat.jpg"},
        "state": "success",
        "videoInfo": {"videoId": "v1", "videoUrl": URL + "r.mp4", "imageUrl": URL + "r.png"},
        "failCode": None,
        "failMsg": "",
        "expireFlag": 0,
    }
    reading = read_status(F.RUNWAY, data)
    assert reading.outcome is S
    assert reading.result_urls == (URL + "r.mp4", URL + "r.png")


def test_runway_fail_code_is_an_int():
    reading = read_status(F.RUNWAY, {"state": "fail", "failCode": 400, "failMsg": "NSFW"})
    assert (reading.outcome, reading.error_code, reading.error_message) == (X, "400", "NSFW")


def test_aleph_record_info():
    data = {
        "taskId": "a1",
        "paramJson": '{"prompt":"x","videoUrl":"https://in.test/in.mp4"}',
        "response": {
            "taskId": "a1",
            "resultVideoUrl": URL + "a.mp4",
            "resultImageUrl": URL + "a.png",
        },
        "successFlag": 1,
        "errorCode": 0,
        "errorMessage": "",
    }
    assert read_status(F.ALEPH, data) == StatusReading(
        outcome=S,
        kie_state="1",
        result_urls=(URL + "a.mp4", URL + "a.png"),
        error_code=None,
        error_message=None,
    )


def test_suno_record_info_is_camel_case():
    data = {
        "taskId": "s1",
        "param": '{"prompt":"x","callBackUrl":"https://hooks.test/kie"}',
        "response": {
            "taskId": "s1",
            "sunoData": [
                {
                    "id": "t1",
                    "audioUrl": URL + "1.mp3",
                    "streamAudioUrl": URL + "1.stream",
                    "imageUrl": URL + "1.jpg",
                },
                {"id": "t2", "audioUrl": URL + "2.mp3"},
            ],
        },
        "status": "SUCCESS",
        "errorCode": None,
        "errorMessage": None,
    }
    reading = read_status(F.SUNO, data)
    assert reading.outcome is S
    assert reading.result_urls == (URL + "1.mp3", URL + "1.stream", URL + "1.jpg", URL + "2.mp3")


def test_suno_first_success_is_pending_even_with_a_track():
    data = {
        "status": "FIRST_SUCCESS",
        "response": {"sunoData": [{"audioUrl": URL + "1.mp3"}]},
    }
    reading = read_status(F.SUNO, data)
    assert (reading.outcome, reading.result_urls) == (P, (URL + "1.mp3",))


def test_suno_failure_detail():
    data = {"status": "SENSITIVE_WORD_ERROR", "errorCode": 400, "errorMessage": "lyrics"}
    reading = read_status(F.SUNO, data)
    assert (reading.outcome, reading.error_code, reading.error_message) == (X, "400", "lyrics")


def test_suno_cover_images_and_error_code_200_is_no_error():
    data = {
        "taskId": "c1",
        "parentTaskId": "p1",
        "callbackUrl": "https://hooks.test/kie",
        "response": {"images": [URL + "c1.png", URL + "c2.png"]},
        "successFlag": 1,
        "errorCode": 200,
        "errorMessage": "",
    }
    assert read_status(F.SUNO_COVER, data) == StatusReading(
        outcome=S,
        kie_state="1",
        result_urls=(URL + "c1.png", URL + "c2.png"),
        error_code=None,
        error_message=None,
    )


def test_suno_wav_and_vocal_removal():
    wav = read_status(F.SUNO_WAV, {"status": "SUCCESS", "response": {"audioWavUrl": URL + "a.wav"}})
    assert (wav.outcome, wav.result_urls) == (S, (URL + "a.wav",))
    vocal = read_status(
        F.SUNO_VOCAL,
        {
            "status": "SUCCESS",
            "response": {
                "vocal_removal_info": {
                    "instrumental_url": URL + "i.mp3",
                    "origin_url": "",
                    "vocal_url": URL + "v.mp3",
                }
            },
        },
    )
    assert (vocal.outcome, vocal.result_urls) == (S, (URL + "i.mp3", URL + "v.mp3"))


def test_4o_record_info_either_spelling():
    camel = {"status": "SUCCESS", "progress": "1.00", "response": {"resultUrls": [URL + "a.png"]}}
    snake = {"successFlag": 1, "response": {"result_urls": [URL + "b.png"]}}
    assert read_status(F.GPT4O, camel).result_urls == (URL + "a.png",)
    assert read_status(F.GPT4O, snake).result_urls == (URL + "b.png",)


def test_flux_record_info_result_before_origin():
    data = {
        "successFlag": 1,
        "response": {"originImageUrl": URL + "o.jpg", "resultImageUrl": URL + "r.jpg"},
    }
    assert read_status(F.FLUX_KONTEXT, data).result_urls == (URL + "r.jpg", URL + "o.jpg")


def test_mj_record_info_urls_are_objects():
    data = {
        "taskId": "mj_1",
        "paramJson": '{"prompt":"x","fileUrl":"https://in.test/x.png"}',
        "resultInfoJson": {
            "resultUrls": [{"resultUrl": URL + "0.png"}, {"resultUrl": URL + "1.png"}]
        },
        "successFlag": 1,
        "errorCode": None,
        "errorMessage": "",
    }
    reading = read_status(F.MJ, data)
    assert (reading.outcome, reading.result_urls) == (S, (URL + "0.png", URL + "1.png"))


def test_luma_generated_but_callback_failed():
    reading = read_status(F.LUMA, {"successFlag": 4, "resultUrls": [URL + "l.mp4"]})
    assert (reading.outcome, reading.result_urls) == (S, (URL + "l.mp4",))


@pytest.mark.parametrize("data", [None, [], [{"successFlag": 1}], "x", 1, True, 1.5, {}])
@pytest.mark.parametrize("family", list(Family))
def test_malformed_data_is_unknown(family, data):
    assert read_status(family, data).outcome is U


def test_read_status_never_raises():
    class Hostile(dict):
        def items(self):
            raise RuntimeError("boom")

    assert read_status(F.MARKET, Hostile(state="success")).outcome is U


def test_specs_cover_every_family():
    assert set(SPECS) == set(Family)
    for family, spec in SPECS.items():
        assert isinstance(spec, FamilySpec)
        assert spec.family is family
        assert spec.create_path.startswith("/api/v1/")
        assert spec.status_path.startswith("/api/v1/")


@pytest.mark.parametrize(
    ("family", "create", "status"),
    [
        (F.MARKET, "/api/v1/jobs/createTask", "/api/v1/jobs/recordInfo"),
        (F.VEO, "/api/v1/veo/generate", "/api/v1/veo/record-info"),
        (F.RUNWAY, "/api/v1/runway/generate", "/api/v1/runway/record-detail"),
        (F.ALEPH, "/api/v1/aleph/generate", "/api/v1/aleph/record-info"),
        (F.SUNO, "/api/v1/generate", "/api/v1/generate/record-info"),
        (F.SUNO_LYRICS, "/api/v1/lyrics", "/api/v1/lyrics/record-info"),
        (F.SUNO_WAV, "/api/v1/wav/generate", "/api/v1/wav/record-info"),
        (F.SUNO_VOCAL, "/api/v1/vocal-removal/generate", "/api/v1/vocal-removal/record-info"),
        (F.SUNO_MIDI, "/api/v1/midi/generate", "/api/v1/midi/record-info"),
        (F.SUNO_COVER, "/api/v1/suno/cover/generate", "/api/v1/suno/cover/record-info"),
        (F.GPT4O, "/api/v1/gpt4o-image/generate", "/api/v1/gpt4o-image/record-info"),
        (F.FLUX_KONTEXT, "/api/v1/flux/kontext/generate", "/api/v1/flux/kontext/record-info"),
        (F.MJ, "/api/v1/mj/generate", "/api/v1/mj/record-info"),
        (F.LUMA, "/api/v1/modify/generate", "/api/v1/modify/record-info"),
    ],
)
def test_spec_paths(family, create, status):
    assert (SPECS[family].create_path, SPECS[family].status_path) == (create, status)
