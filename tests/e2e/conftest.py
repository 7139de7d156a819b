"""e2e fixtures: one S3-protocol server (moto) and one MLflow tracking server per session, and a
fresh S3 prefix per test (each test module tracks into experiments of its own)."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest

from tests.e2e.s3server import MotoS3
from tests.e2e.servers import MlflowServer


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server with bucket ``runs`` and IAM users ``admin`` / ``reader``."""
    server = MotoS3(buckets=("runs",)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3env(moto_s3, monkeypatch):
    """The standard AWS variables pointed at the server as ``admin``; a fresh ``s3://runs/...``."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_s3.env("admin").items():
        monkeypatch.setenv(name, value)
    return f"s3://runs/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` (sqlite backend, local artifacts) on 127.0.0.1, by pid."""
    server = MlflowServer(Path(tempfile.mkdtemp(prefix="fbmlf", dir="/tmp")))
    try:
        yield server.start()
    finally:
        server.stop()
