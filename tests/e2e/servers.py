"""Start and stop real Ray head / MLflow server processes on 127.0.0.1 for e2e tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedbip_ray.runtime.local_cluster import wait_http

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
              "MLFLOW_DISABLE_TELEMETRY": "true",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
              "PATH": f"{BIN}{os.pathsep}{e.get('PATH', '')}"})
    e.pop("RAY_ADDRESS", None)
    return e


class RayHead:
    """``ray start --head`` on 127.0.0.1 with its own temp dir; ``stop()`` runs ``ray stop``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"

    def start(self) -> RayHead:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--num-gpus=0", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dash_port}", "--disable-usage-stats",
             f"--temp-dir={self.tmp}",
             # every port explicit and free: another Ray on this machine (a test session, a
             # notebook) must not make this head's job agent fail to bind its default port
             f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--ray-client-server-port={free_port()}"],
            check=True, env=env(), capture_output=True, timeout=120)
        wait_http(f"{self.dashboard}/api/version", 60)
        self._wait_job_agent(90)
        return self

    def _wait_job_agent(self, timeout: float) -> None:
        """Until the head's job agent answers (``ray job list`` succeeds)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.dashboard],
                                  env=env(), capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                return
            time.sleep(2)

    def submit(self, cwd: Path, *entrypoint: str,
               timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit`` (retried for a minute while the job agent is still starting)."""
        start = time.time()
        retry_until = start + 60  # the job agent may still be starting
        while True:
            proc = subprocess.run(
                [str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
                 "--working-dir", ".",
                 "--", *entrypoint], cwd=cwd, env=env(), capture_output=True, text=True,
                timeout=max(30.0, start + timeout - time.time()))
            agent_down = "No available agent" in proc.stdout + proc.stderr
            if not agent_down or time.time() > retry_until:
                return proc
            time.sleep(3)

    def stop(self) -> None:
        """Stop this head's processes only (other Ray instances on the machine are left alone)."""
        import psutil

        mine = [p for p in psutil.process_iter(["cmdline"])
                if any(str(self.tmp) in part or f"--gcs-address=127.0.0.1:{self.gcs_port}" in part
                       or f"--port={self.gcs_port}" in part for part in (p.info["cmdline"] or []))]
        for p in mine:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(mine, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.tmp}/mlflow.db",
             "--default-artifact-root", str(self.tmp / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"{self.uri}/health", 90)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
