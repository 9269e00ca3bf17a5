"""A real S3-compatible server for tests: moto in server mode, as a process of its own.

One server per test session, started on first use on a free port of 127.0.0.1 (``python -m
moto.server``); each test gets a bucket of its own (fixture ``s3_server`` in
``tests/conftest.py``). moto accepts any credentials until :meth:`MotoServer.enforce_auth`
switches its IAM checks on (then only the keys it made itself sign requests correctly).

What moto does not do: it does not refuse an expired presigned URL, and with IAM checks on it
cannot answer presigned URLs at all (it fails with a 500), so those are tested without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from tests.procs import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["MotoServer", "S3Target"]

REGION = "us-east-1"
ACCESS_KEY_ID = "kied-test-access-key"
SECRET_ACCESS_KEY = "kied-test-secret-0123456789"


@dataclass(frozen=True)
class S3Target:
    """Where a test's files go: a fresh bucket on the server, and credentials for it."""

    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str
    server: MotoServer

    def backend_kwargs(self, prefix: str = "") -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "prefix": prefix,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": None,
        }

    def client(self) -> Any:
        """A plain boto3 client, for a test to look at the bucket itself."""
        return self.server.client(self.access_key_id, self.secret_access_key)


class MotoServer:
    """``python -m moto.server`` on a free port of 127.0.0.1, started on first use."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def endpoint_url(self) -> str:
        if self._url is None:
            self._start()
        assert self._url is not None
        return self._url

    def _start(self) -> None:
        port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/moto-api/data.json", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("moto server did not start (is moto[server] installed?)")
            time.sleep(0.05)
        self._url = url

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def client(self, access_key_id: str, secret_access_key: str) -> Any:
        import boto3  # here, so that test sessions without S3 tests never load boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def new_bucket(self) -> S3Target:
        bucket = f"kied-test-{uuid.uuid4().hex[:12]}"
        self.client(ACCESS_KEY_ID, SECRET_ACCESS_KEY).create_bucket(Bucket=bucket)
        return S3Target(
            self.endpoint_url, bucket, ACCESS_KEY_ID, SECRET_ACCESS_KEY, REGION, server=self
        )

    @contextmanager
    def enforce_auth(self) -> Iterator[tuple[str, str]]:
        """Switch moto's IAM checks on; yields an access key id and secret it accepts."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )
        user = f"kied-{uuid.uuid4().hex[:8]}"
        # The next three requests (the IAM set-up) go unchecked, every later one is checked.
        httpx.post(f"{self.endpoint_url}/moto-api/reset-auth", content=b"3").raise_for_status()
        try:
            iam.create_user(UserName=user)
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
            iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            httpx.post(
                f"{self.endpoint_url}/moto-api/reset-auth", content=b"inf"
            ).raise_for_status()
