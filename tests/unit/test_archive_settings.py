"""KIED_ARCHIVE and its companions, and the directory backend's keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from kied.archive import DirArchive, archive_key, open_archive
from kied.cli import secrets_of
from kied.errors import ConfigError
from kied.settings import DirArchiveSettings, S3ArchiveSettings, load_settings

_PG = "postgresql://kied@127.0.0.1/kied"


def test_sqlite_archives_beside_the_database_by_default():
    s = load_settings({"KIED_DATABASE_URL": "/srv/kied/kied.db"})
    assert s.archive == DirArchiveSettings(path=Path("/srv/kied/archive"))
    assert s.archive_max_bytes == 1024 * 1024 * 1024
    assert s.archive_allow_hosts == frozenset()
    assert s.notify_after_archive is False


def test_postgres_archives_nothing_by_default():
    assert load_settings({"KIED_DATABASE_URL": _PG}).archive is None


def test_dir_none_and_the_flag():
    s = load_settings({"KIED_ARCHIVE": "dir:/data/files"})
    assert s.archive == DirArchiveSettings(path=Path("/data/files"))
    assert load_settings({"KIED_ARCHIVE": "none"}).archive is None
    s = load_settings({"KIED_ARCHIVE": "none"}, ["--archive", "dir:/x"])
    assert s.archive == DirArchiveSettings(path=Path("/x"))


def test_s3_reads_the_usual_aws_variables():
    s = load_settings(
        {
            "KIED_DATABASE_URL": _PG,
            "KIED_ARCHIVE": "s3://results-bucket/kied/files/",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret-key",
            "AWS_SESSION_TOKEN": "session-token-value",
        }
    )
    assert s.archive == S3ArchiveSettings(
        bucket="results-bucket",
        prefix="kied/files",
        endpoint_url="http://127.0.0.1:9000",
        region="eu-west-1",
        access_key_id="AKIAEXAMPLE",
        secret_access_key="very-secret-key",
        session_token="session-token-value",
    )
    assert "very-secret-key" not in repr(s)
    assert {"very-secret-key", "session-token-value"} <= set(secrets_of(s))
    s3 = load_settings(
        {
            "KIED_ARCHIVE": "s3://b",
            "AWS_ENDPOINT_URL": "http://one:9000",
            "AWS_ENDPOINT_URL_S3": "http://two:9000",
            "AWS_REGION": "us-east-2",
            "AWS_DEFAULT_REGION": "eu-west-1",
        }
    ).archive
    assert isinstance(s3, S3ArchiveSettings)
    assert (s3.endpoint_url, s3.region, s3.prefix) == ("http://two:9000", "us-east-2", "")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"KIED_ARCHIVE": "ftp://x"}, "KIED_ARCHIVE"),
        ({"KIED_ARCHIVE": "dir:"}, "KIED_ARCHIVE"),
        ({"KIED_ARCHIVE": "s3://"}, "KIED_ARCHIVE"),
        ({"KIED_ARCHIVE": "s3://b/../x"}, "KIED_ARCHIVE"),
        ({"KIED_ARCHIVE": "s3://b", "AWS_ENDPOINT_URL": "minio:9000"}, "AWS_ENDPOINT_URL"),
        ({"KIED_ARCHIVE_MAX_BYTES": "0"}, "KIED_ARCHIVE_MAX_BYTES"),
        ({"KIED_ARCHIVE_MAX_BYTES": "1GB"}, "KIED_ARCHIVE_MAX_BYTES"),
        ({"KIED_ARCHIVE_TIMEOUT": "-1"}, "KIED_ARCHIVE_TIMEOUT"),
        ({"KIED_ARCHIVE_CONCURRENCY": "0"}, "KIED_ARCHIVE_CONCURRENCY"),
        ({"KIED_ARCHIVE_ALLOW_HOSTS": "http://x/"}, "KIED_ARCHIVE_ALLOW_HOSTS"),
        ({"KIED_NOTIFY_AFTER_ARCHIVE": "maybe"}, "KIED_NOTIFY_AFTER_ARCHIVE"),
    ],
)
def test_bad_values_name_the_setting(environ, named):
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    assert str(info.value).startswith(named)
    assert "\n" not in str(info.value)


def test_companions():
    s = load_settings(
        {
            "KIED_ARCHIVE_ALLOW_HOSTS": "127.0.0.1, Files.Internal:8443,",
            "KIED_ARCHIVE_MAX_BYTES": "1048576",
            "KIED_ARCHIVE_TIMEOUT": "30",
            "KIED_ARCHIVE_CONCURRENCY": "8",
            "KIED_NOTIFY_AFTER_ARCHIVE": "1",
        }
    )
    assert s.archive_allow_hosts == {"127.0.0.1", "files.internal:8443"}
    assert (s.archive_max_bytes, s.archive_file_timeout_s, s.archive_concurrency) == (
        1048576,
        30.0,
        8,
    )
    assert s.notify_after_archive is True


def test_keys_come_from_kied_not_the_url():
    assert archive_key("job-1", 0, "image/png") == "job-1/0.png"
    assert archive_key("job-1", 2, "video/mp4; codecs=avc1") == "job-1/2.mp4"
    assert archive_key("job-1", 1, "image/jpeg") == "job-1/1.jpg"
    assert archive_key("job-1", 3, "application/x-unheard-of") == "job-1/3.bin"
    assert archive_key("job-1", 3, "../../etc") == "job-1/3.bin"


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "./a", "a/", "a\x00b"]
)
def test_path_of_refuses_what_is_not_a_key(tmp_path, key):
    with pytest.raises(ValueError, match="not an archive key"):
        DirArchive(tmp_path).path_of(key)


async def test_put_replaces_whole_files_and_delete_forgets(tmp_path):
    source = tmp_path / "download"
    source.write_bytes(b"first")
    async with open_archive(DirArchiveSettings(path=tmp_path / "archive")) as archive:
        assert isinstance(archive, DirArchive)
        assert archive.kind == "dir"
        await archive.put("job-1/0.png", source, content_type="image/png", sha256="", size=5)
        source.write_bytes(b"second, longer")
        await archive.put("job-1/0.png", source, content_type="image/png", sha256="", size=14)
        assert archive.path_of("job-1/0.png").read_bytes() == b"second, longer"
        assert source.exists()  # the caller's
        assert sorted(p.name for p in (tmp_path / "archive" / "job-1").iterdir()) == ["0.png"]
        assert await archive.exists("job-1/0.png")
        assert await archive.presign("job-1/0.png", expires_s=60, content_type="image/png") is None
        await archive.delete(["job-1/0.png", "job-1/1.png"])
        assert not await archive.exists("job-1/0.png")
        assert not (tmp_path / "archive" / "job-1").exists()


async def test_open_archive_none_and_s3():
    async with open_archive(None) as archive:
        assert archive is None
    settings = S3ArchiveSettings(
        bucket="b",
        prefix="p",
        endpoint_url="http://user:pw@127.0.0.1:9",
        secret_access_key="hunter2",
    )
    async with open_archive(settings) as archive:
        assert archive is not None
        assert archive.kind == "s3"
        assert archive.describe() == "s3://b/p at http://127.0.0.1:9"
