"""A real S3-protocol server (moto) on 127.0.0.1 for e2e tests, with IAM checks switched on.

Before authentication is enforced it creates the buckets and two IAM users: ``admin`` (s3:*) and
``reader`` (get/list only: a write is denied by the server's own policy evaluation).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.servers import free_port

BIN = Path(sys.executable).parent
POLICIES = {"admin": ["s3:*"], "reader": ["s3:GetObject", "s3:ListBucket"]}


@dataclass
class MotoS3:
    """``moto_server`` started by pid; ``keys[user] = (access key id, secret)``."""

    buckets: tuple[str, ...] = ("runs",)
    port: int = field(default_factory=free_port)
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MotoS3:
        exe = BIN / "moto_server"
        if not exe.exists():
            raise RuntimeError(f"{exe} not found: install the test extra (moto[server], boto3)")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self._wait(timeout)
        self._setup()
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"moto_server not up on {self.endpoint} after {timeout}s")

    def _setup(self) -> None:
        import boto3

        kw = dict(endpoint_url=self.endpoint, aws_access_key_id="bootstrap",
                  aws_secret_access_key="bootstrap", region_name="us-east-1")
        s3, iam = boto3.client("s3", **kw), boto3.client("iam", **kw)
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)
        for user, actions in POLICIES.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17",
                 "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                     method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise RuntimeError("moto: could not switch authentication on")

    def env(self, user: str = "admin") -> dict[str, str]:
        """The standard AWS variables that point a client at this server as ``user``."""
        key, secret = self.keys[user]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
