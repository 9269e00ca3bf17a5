"""The S3 archive backend against a real S3-compatible server (moto, tests/s3.py).

Real time, not the autojump clock: every call runs in a worker thread and talks to a real
socket. Each test has a bucket of its own.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from kied.archive import S3Backend, open_s3_backend
from tests.procs import free_port

if TYPE_CHECKING:
    from pathlib import Path

    from tests.s3 import S3Target

MIB = 1024 * 1024


def write(path: Path, data: bytes) -> tuple[Path, str, int]:
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def stored(target: S3Target, key: str) -> tuple[bytes, dict[str, object]]:
    answer = target.client().get_object(Bucket=target.bucket, Key=key)
    return answer["Body"].read(), answer


async def test_put_stores_the_file_with_its_type_and_sha256_under_the_prefix(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", b"\x89PNG small file")
    with trio.fail_after(30):
        async with open_s3_backend(**s3_server.backend_kwargs("/archive/kied/")) as s3:
            assert s3.kind == "s3"
            await s3.put("job-1/0.png", source, content_type="image/png", sha256=sha, size=size)
            assert await s3.exists("job-1/0.png")
    body, answer = stored(s3_server, "archive/kied/job-1/0.png")
    assert body == b"\x89PNG small file"
    assert answer["ContentType"] == "image/png"
    assert answer["Metadata"] == {"sha256": sha}
    assert source.exists()  # the caller's to delete
    # No checksum sent where S3 does not demand one (some compatible stores refuse them).
    head = s3_server.client().head_object(
        Bucket=s3_server.bucket, Key="archive/kied/job-1/0.png", ChecksumMode="ENABLED"
    )
    assert not [name for name in head if name.startswith("Checksum") and name != "ChecksumType"]


async def test_a_big_file_goes_up_in_parts(s3_server: S3Target, tmp_path: Path) -> None:
    data = os.urandom(11 * MIB)  # over a 5 MiB threshold: three parts
    source, sha, size = write(tmp_path / "big", data)
    kwargs = s3_server.backend_kwargs() | {
        "multipart_threshold": 5 * MIB,
        "multipart_chunksize": 5 * MIB,
    }
    with trio.fail_after(60):
        async with open_s3_backend(**kwargs) as s3:
            await s3.put("job-2/0.mp4", source, content_type="video/mp4", sha256=sha, size=size)
    body, answer = stored(s3_server, "job-2/0.mp4")
    assert hashlib.sha256(body).hexdigest() == sha
    assert str(answer["ETag"]).strip('"').endswith("-3")  # a multipart upload of 3 parts
    assert answer["ContentType"] == "video/mp4"
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket)
    assert not uploads.get("Uploads")


async def test_put_replaces_and_refuses_a_file_of_the_wrong_size(
    s3_server: S3Target, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with open_s3_backend(**s3_server.backend_kwargs()) as s3:
            for content in (b"first", b"second!"):
                source, sha, size = write(tmp_path / "f", content)
                await s3.put("j/0.bin", source, content_type="text/plain", sha256=sha, size=size)
            assert stored(s3_server, "j/0.bin")[0] == b"second!"
            with pytest.raises(OSError, match=r"S3 put kied-test-\w+/j/1\.bin: .*7 bytes, not 8"):
                await s3.put("j/1.bin", source, content_type="text/plain", sha256=sha, size=8)
            with pytest.raises(OSError, match=r"S3 put .*FileNotFoundError"):
                await s3.put(
                    "j/2.bin", tmp_path / "gone", content_type="text/plain", sha256=sha, size=1
                )
            assert not await s3.exists("j/1.bin")


async def test_exists_and_delete_including_missing_keys(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", b"x" * 100)
    with trio.fail_after(30):
        async with open_s3_backend(**s3_server.backend_kwargs("p")) as s3:
            for key in ("a/0.png", "a/1.png", "b/0.png"):
                await s3.put(key, source, content_type="image/png", sha256=sha, size=size)
            assert not await s3.exists("a/2.png")
            await s3.delete(["a/0.png", "a/1.png", "a/never-there.png"])
            await s3.delete([])
            await s3.delete(["a/0.png"])  # again: nothing to do, no error
            assert [await s3.exists(k) for k in ("a/0.png", "a/1.png", "b/0.png")] == [
                False,
                False,
                True,
            ]
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket)
    assert [o["Key"] for o in listing["Contents"]] == ["p/b/0.png"]


async def test_presign_serves_the_bytes_with_the_asked_content_type(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", b"RIFF....WEBPVP8 ")
    with trio.fail_after(30):
        async with open_s3_backend(**s3_server.backend_kwargs("pre")) as s3:
            await s3.put("j/0.webp", source, content_type="image/png", sha256=sha, size=size)
            url = await s3.presign("j/0.webp", expires_s=299.2, content_type="image/webp")
            assert url is not None
            async with httpx.AsyncClient(trust_env=False) as http:
                r = await http.get(url)
            assert r.status_code == 200
            assert r.content == b"RIFF....WEBPVP8 "
            assert r.headers["content-type"] == "image/webp"
            query = parse_qs(urlsplit(url).query)
            assert query["X-Amz-Expires"] == ["300"]  # rounded up to whole seconds
            signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
            assert abs(signed_at - time.mktime(time.gmtime())) < 60
            assert query["response-content-type"] == ["image/webp"]
            assert urlsplit(url).path == f"/{s3_server.bucket}/pre/j/0.webp"  # path style
            for bad in (0, -1, math.nan, 7 * 24 * 3600 + 1):
                with pytest.raises(ValueError, match="expires_s"):
                    await s3.presign("j/0.webp", expires_s=bad, content_type="image/webp")


async def test_a_missing_bucket_is_an_oserror_naming_it(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", b"data")
    kwargs = s3_server.backend_kwargs() | {"bucket": "kied-no-such-bucket"}
    with trio.fail_after(30):
        async with open_s3_backend(**kwargs) as s3:
            with pytest.raises(OSError, match=r"S3 put kied-no-such-bucket/k/0\.png: ") as info:
                await s3.put("k/0.png", source, content_type="image/png", sha256=sha, size=size)
            assert "NoSuchBucket" in str(info.value)
            with pytest.raises(OSError, match=r"S3 delete kied-no-such-bucket/k/0\.png: NoSuch"):
                await s3.delete(["k/0.png"])
            # HEAD answers carry no body: a missing bucket looks like a missing key.
            assert not await s3.exists("k/0.png")
    assert s3_server.secret_access_key not in str(info.value)


async def test_bad_credentials_are_an_oserror_without_the_secret(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", b"data")
    wrong_secret = "wrong-secret-that-must-not-leak-0123"
    with s3_server.server.enforce_auth() as (key_id, secret):
        good = s3_server.backend_kwargs() | {"access_key_id": key_id, "secret_access_key": secret}
        bad = good | {"secret_access_key": wrong_secret, "max_attempts": 1}
        with trio.fail_after(30):
            async with open_s3_backend(**good) as s3:
                await s3.put("c/0.png", source, content_type="image/png", sha256=sha, size=size)
                assert await s3.exists("c/0.png")
            async with open_s3_backend(**bad) as s3:
                errors = []
                for call in (
                    s3.put("c/1.png", source, content_type="image/png", sha256=sha, size=size),
                    s3.exists("c/0.png"),
                    s3.delete(["c/0.png"]),
                ):
                    with pytest.raises(OSError, match=r"^S3 ") as info:
                        await call
                    errors.append(str(info.value))
    assert "SignatureDoesNotMatch" in errors[0]
    assert "(HTTP 403)" in errors[1]
    for message in errors:
        assert message.startswith("S3 ")
        assert wrong_secret not in message
        assert key_id not in message
        assert secret not in message


async def test_an_unreachable_store_fails_within_the_timeouts(tmp_path: Path) -> None:
    source, sha, size = write(tmp_path / "f", b"data")
    kwargs = {
        "bucket": "kied-archive",
        "prefix": "",
        "endpoint_url": f"http://user:pass@127.0.0.1:{free_port()}",
        "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": "a-secret-never-shown",
        "connect_timeout_s": 1.0,
        "read_timeout_s": 1.0,
        "max_attempts": 2,
    }
    t0 = time.monotonic()
    with trio.fail_after(30):
        async with open_s3_backend(**kwargs) as s3:
            assert s3.describe() == f"s3://kied-archive at {kwargs['endpoint_url']}".replace(
                "user:pass@", ""
            )
            with pytest.raises(OSError, match=r"S3 put kied-archive/k/0\.png: ") as info:
                await s3.put("k/0.png", source, content_type="image/png", sha256=sha, size=size)
    assert time.monotonic() - t0 < 10
    assert "a-secret-never-shown" not in str(info.value)
    assert "pass@" not in str(info.value)


async def test_a_cancelled_put_returns_at_once_and_its_upload_stops(
    s3_server: S3Target, tmp_path: Path
) -> None:
    source, sha, size = write(tmp_path / "f", os.urandom(16 * MIB))
    client = s3_server.client()

    def uploading() -> bool:
        return bool(client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads"))

    kwargs = s3_server.backend_kwargs() | {
        "multipart_threshold": 5 * MIB,
        "multipart_chunksize": 5 * MIB,
        "part_concurrency": 1,  # four parts one after the other: time to cancel it
    }
    with trio.fail_after(30):
        async with open_s3_backend(**kwargs) as s3, trio.open_nursery() as nursery:
            done = trio.Event()

            async def put() -> None:
                try:
                    await s3.put(
                        "x/0.bin", source, content_type="text/plain", sha256=sha, size=size
                    )
                finally:
                    done.set()

            nursery.start_soon(put)
            while not await trio.to_thread.run_sync(uploading):  # noqa: ASYNC110
                await trio.sleep(0.005)
            t0 = time.monotonic()
            nursery.cancel_scope.cancel()
        assert done.is_set()
        assert time.monotonic() - t0 < 0.1
        # The abandoned thread stops at its next read and aborts the multipart upload.
        while await trio.to_thread.run_sync(uploading):  # noqa: ASYNC110
            await trio.sleep(0.02)
        assert "Contents" not in client.list_objects_v2(Bucket=s3_server.bucket)


async def test_a_session_token_signs_along() -> None:
    s3 = S3Backend(
        bucket="media",
        prefix="",
        endpoint_url="http://127.0.0.1:9",
        access_key_id="ASIAEXAMPLE",
        secret_access_key="secret-value",
        session_token="the-session-token",
    )
    try:
        with trio.fail_after(30):
            url = await s3.presign("j/0.png", expires_s=60, content_type="image/png")
        assert url is not None
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Security-Token"] == ["the-session-token"]
        assert query["X-Amz-Credential"][0].startswith("ASIAEXAMPLE/")
        assert "secret-value" not in url
    finally:
        s3.close()


def test_describe_and_prefixes_hold_no_secret() -> None:
    s3 = S3Backend(
        bucket="media",
        prefix="//kied/results//",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="secret-value",
    )
    try:
        assert s3.describe() == "s3://media/kied/results in us-east-1"
        assert s3.object_key("job/0.png") == "kied/results/job/0.png"
        assert S3Backend(bucket="media", prefix="", region="eu-west-3").describe() == (
            "s3://media in eu-west-3"
        )
        assert S3Backend(bucket="media", prefix="/").object_key("j/0.png") == "j/0.png"
    finally:
        s3.close()


BAD_KEYS = [
    "",
    "/abs/0.png",
    "../0.png",
    "j/../0.png",
    "j/./0.png",
    "j//0.png",
    "j\\0.png",
    "j\x00",
]


async def test_bad_keys_are_refused_before_any_request(tmp_path: Path) -> None:
    source, sha, size = write(tmp_path / "f", b"data")
    # No endpoint answers here: a request would be an OSError, not a ValueError.
    s3 = S3Backend(bucket="media", prefix="p", endpoint_url=f"http://127.0.0.1:{free_port()}")
    try:
        for key in BAD_KEYS:
            with pytest.raises(ValueError, match="not an archive key"):
                await s3.put(key, source, content_type="image/png", sha256=sha, size=size)
            with pytest.raises(ValueError, match="not an archive key"):
                await s3.exists(key)
            with pytest.raises(ValueError, match="not an archive key"):
                await s3.delete(["ok/0.png", key])
            with pytest.raises(ValueError, match="not an archive key"):
                await s3.presign(key, expires_s=60, content_type="image/png")
    finally:
        s3.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket": ""},
        {"bucket": "Not_Valid Bucket"},
        {"multipart_chunksize": MIB},
        {"threads": 0},
        {"read_timeout_s": math.inf},
    ],
)
def test_bad_construction_is_a_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        S3Backend(**{"bucket": "media", "prefix": ""} | kwargs)  # type: ignore[arg-type]


def test_importing_kied_archive_does_not_import_boto3() -> None:
    import subprocess
    import sys

    code = "import sys, kied.archive; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
