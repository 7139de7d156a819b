"""Run outputs on a real S3-protocol server (moto on 127.0.0.1): a federation writes everything
to ``s3://``, is SIGKILLed mid-run and resumed from the URI by a fresh driver elsewhere; a cut-off
checkpoint upload is never loaded; a Tune search keeps its trials on the store; an MLflow server
with its artifact root on the store receives a run's adapters; bad locations are one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedbip_ray import storage
from fedbip_ray.cli import main
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime import checkpoint as ckpt
from tests.e2e.servers import env as server_env
from tests.e2e.servers import free_port, wait_http

from ..conftest import REPO, clean_config, clean_run, tiny_config

pytestmark = pytest.mark.e2e
BIN = REPO / ".venv" / "bin"


def _cli_env(extra: dict[str, str], cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra, PYTHONUNBUFFERED="1", FEDBIP_CACHE_DIR=str(cache))
    return env


def _summary(text: str) -> dict:
    return json.loads(text)["per_client_accuracy"]


def test_killed_run_resumes_from_the_uri_on_a_fresh_driver(s3env, moto_s3, ray_local, tmp_path,
                                                          tmp_path_factory):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(clean_config()))
    rounds = clean_config()["federation"]["rounds"]
    aws = moto_s3.env("admin")
    clean = clean_run(tmp_path_factory)[1]
    out = storage.open_location(s3env)
    first = tmp_path / "driver1"
    first.mkdir()
    log = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen([str(BIN / "fedbip"), "run", str(cfg), "--output", s3env], cwd=first,
                            env=_cli_env(aws, tmp_path / "c1"), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "latest.json").exists():
            break
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: after round 1's checkpoint
    proc.wait(timeout=30)
    assert not (out / "summary.json").exists()
    assert (out / "config.yaml").exists() and (out / "shards" / "clients.json").exists()
    second = tmp_path / "driver2"  # another working directory and an empty local cache
    second.mkdir()
    res = subprocess.run([str(BIN / "fedbip"), "run", "--resume", s3env, "--quiet"], cwd=second,
                         env=_cli_env(aws, tmp_path / "c2"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _summary((out / "summary.json").read_text()) == _summary(
        (clean / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))  # none lost or twice
    assert set(out.listdir()) >= {"checkpoints", "config.yaml", "metrics", "metrics.jsonl",
                                  "shards", "similarity", "similarity.jsonl", "summary.json"}
    latest = ckpt.read_latest(out / "checkpoints")
    assert latest is not None and latest.round == rounds


def _tensors(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"states": rng.standard_normal((n, d)).astype(np.float32),
            "init": np.zeros(d, dtype=np.float32)}


def test_a_cut_off_checkpoint_upload_is_never_loaded(s3env):
    root = storage.open_location(s3env) / "checkpoints"
    layout = Layout.from_shapes({"w": (5,)}).to_dict()
    history = [{"round": 1}, {"round": 2}]
    for rnd in (1, 2):
        ckpt.write_checkpoint(root, rnd, _tensors(3, 5, rnd), layout, history[:rnd], {"seed": 0})
    assert ckpt.read_latest(root).round == 2
    # round 3 uploaded its tensors but the pointer never moved: invisible
    (root / "round_00003" / ckpt.TENSORS).write_bytes(b"\x00" * 64)
    assert ckpt.read_latest(root).round == 2
    # the pointed round's tensor object truncated afterwards: the previous complete one loads
    blob = (root / "round_00002" / ckpt.TENSORS).read_bytes()
    (root / "round_00002" / ckpt.TENSORS).write_bytes(blob[: len(blob) // 2])
    ck = ckpt.read_latest(root)
    assert ck is not None and ck.round == 1
    np.testing.assert_array_equal(ck.tensors["states"], _tensors(3, 5, 1)["states"])


@pytest.mark.parametrize("case,needle", [
    ("missing-bucket", "cannot be written"),
    ("denied-write", "cannot be written"),
    ("unreachable", "cannot be written"),
    ("unknown-scheme", "foo://x"),
])
def test_a_bad_location_is_one_line_before_any_work(case, needle, s3env, moto_s3, monkeypatch,
                                                   tmp_path, capfd):
    target = {"missing-bucket": "s3://no-such-bucket-here/run", "denied-write": s3env,
              "unreachable": s3env, "unknown-scheme": "foo://x"}[case]
    if case == "denied-write":
        for k, v in moto_s3.env("reader").items():
            monkeypatch.setenv(k, v)
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config()))
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["run", str(tmp_path / "c.yaml"), "--output", target])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fedbip: error: ") and needle in err[0], err[0]
    for _, secret in moto_s3.keys.values():
        assert secret not in err[0]
    assert not (tmp_path / "runs").exists()  # nothing was built


def test_a_tune_search_keeps_its_trials_and_summary_on_the_store(s3env, ray_local, tmp_path,
                                                                monkeypatch):
    from fedbip_ray.tuning.search import run_tune

    monkeypatch.chdir(tmp_path)
    summary = run_tune(REPO / "jobs" / "configs" / "tune_tiny.yaml",
                       ["tracking.mlflow=false", "tune.num_samples=2"], s3env)
    out = storage.open_location(s3env)
    stored = json.loads((out / "tune_summary.json").read_text())
    assert stored["best"]["trial_id"] == summary["best"]["trial_id"]
    assert summary["best"]["output"].startswith(s3env)
    best = storage.open_location(summary["best"]["output"])
    assert json.loads((best / "summary.json").read_text())["rounds_completed"] == 2
    assert yaml.safe_load((out / "best_config.yaml").read_text())["name"].endswith("-best")
    assert len(set((out / "trials").listdir())) == 2  # every trial's outputs, whoever ran it


def test_an_mlflow_server_with_its_artifacts_on_the_store_receives_the_adapters(
        s3env, moto_s3, ray_local, tmp_path, monkeypatch):
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.runtime.federation import run_federation
    from fedbip_ray.tracking.mlflow_logger import MlflowCallback

    bucket_prefix = s3env[len("s3://"):] + "/mlflow"
    port = free_port()
    env = {**server_env(), **moto_s3.env("admin"), "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/m.db",
         "--artifacts-destination", f"s3://{bucket_prefix}", "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90)
        cfg = config_from_dict(tiny_config(
            federation={"rounds": 1},
            tracking={"mlflow": True, "tracking_uri": f"http://127.0.0.1:{port}",
                      "experiment": "s3-artifacts"}))
        cb = MlflowCallback(cfg)
        run_federation(cfg, tmp_path / "run", callbacks=[cb], echo=lambda s: None)
        found = [p for p in _walk(storage.open_location(f"s3://{bucket_prefix}"))
                 if "/adapters/client_" in p]
        assert {p.split("/adapters/")[1].split("/")[0] for p in found} == {
            f"client_{c:04d}" for c in range(4)}
        assert any(p.endswith("adapter_config.json") for p in found)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _walk(loc: storage.Location) -> list[str]:
    """Every object key below ``loc`` (as URIs)."""
    out: list[str] = []
    for name in loc.listdir():
        child = loc / name
        out.extend([child.describe()] if child.info().is_file else _walk(child))
    return out


def test_newcomers_join_a_run_that_lives_on_the_store(s3env, ray_local, tmp_path, monkeypatch):
    import fedbip_ray
    from tests.integration.test_join import STRATEGY, _newcomers

    monkeypatch.setenv("FEDBIP_CACHE_DIR", str(tmp_path / "cache"))  # a fresh local side
    fedbip_ray.run(tiny_config(federation={"rounds": 1}, strategy=STRATEGY), output=s3env)
    data = _newcomers(tmp_path)
    rc = main(["join", s3env, "--data", str(data), "--client-column", "user",
               "--output", str(tmp_path / "joined")])
    assert rc == 0
    entries = json.loads((tmp_path / "joined" / "summary.json").read_text())["newcomers"]
    assert sorted(e["name"] for e in entries) == ["g0", "odd"]
    assert all(len(e["weights"]) == 5 for e in entries)  # the run's 4 clients + self
