"""Result files kept by kied, and where they go."""

from __future__ import annotations

from kied.archive._s3 import S3Backend as S3Backend
from kied.archive._s3 import open_s3_backend as open_s3_backend

__all__ = ["S3Backend", "open_s3_backend"]
