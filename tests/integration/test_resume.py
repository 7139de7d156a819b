"""SIGKILL the driver (`fedbip run` with its own embedded Ray) after a checkpoint, resume with
`fedbip run --resume`, and get exactly the uninterrupted run's result."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.numpy import load_file

from fedbip_ray.cli import main

from ..conftest import REPO, clean_config, clean_run, kill_tree

pytestmark = pytest.mark.ray
FEDBIP = str(REPO / ".venv" / "bin" / "fedbip")
# row fields that may differ between two identical runs: timings, memory, and what depends on
# which actor took a call (a validation-gate call taken by another actor is sent the client's
# own state: more bytes out, the same result)
VOLATILE = {"seconds", "bytes_out", "placement"}  # placement: node ids differ per Ray start
VOLATILE_EXTRA = {"client_peak_rss_mib", "gate_locals_sent"}  # every extra.*_seconds too


def stable(row: dict) -> dict:
    """A metrics row without its timing and memory measurements."""
    out = {k: v for k, v in row.items() if k not in VOLATILE}
    out["extra"] = {k: v for k, v in row.get("extra", {}).items()
                    if k not in VOLATILE_EXTRA and not k.endswith("_seconds")}
    return out


def start_run(config: Path, out: Path, log: Path) -> subprocess.Popen:
    """`fedbip run` as a session leader (so its whole process tree can be killed)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([FEDBIP, "run", str(config), "--output", str(out)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)




def latest_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def listening_addresses(session: int) -> set[str]:
    """IP addresses that processes of a session listen on (TCP)."""
    addrs = set()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) != session:
                continue
            addrs |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return addrs


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def final_states(out: Path) -> np.ndarray:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / latest["path"] / "server.safetensors"))["states"]


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(
        ray_local, tmp_path, tmp_path_factory, capsys):
    clean, clean_out = clean_run(tmp_path_factory)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(clean_config()))
    out = tmp_path / "killed"
    proc = start_run(config, out, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 240
        while latest_round(out) < 1:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        # secure default: the embedded Ray listens on loopback only
        addrs = listening_addresses(proc.pid)
        assert addrs and all(is_loopback(a) for a in addrs), addrs
    finally:
        kill_tree(proc)
    killed_at = latest_round(out)
    assert 1 <= killed_at < 3 and not (out / "summary.json").exists(), killed_at

    assert main(["run", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"continuing at round {killed_at + 1}" in printed

    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["per_client_accuracy"] == clean["per_client_accuracy"]
    assert resumed["rounds_completed"] == 3
    assert np.array_equal(final_states(out), final_states(clean_out))  # bitwise
    # metrics.jsonl / similarity.jsonl: every round exactly once, same values as uninterrupted
    got, want = rows(out), rows(clean_out)
    assert [r["round"] for r in got] == [1, 2, 3]
    for a, b in zip(got, want, strict=True):
        assert stable(a) == stable(b)
    assert [r["round"] for r in rows(out, "similarity.jsonl")] == [1, 2, 3]
    assert rows(out, "similarity.jsonl") == rows(clean_out, "similarity.jsonl")


def test_checkpoint_writer_overlaps_one_write_and_surfaces_its_error(ray_local, tmp_path):
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.core import Layout
    from fedbip_ray.runtime.checkpoint import CheckpointWriter, read_latest
    from fedbip_ray.runtime.context import RunContext
    from fedbip_ray.runtime.federation import submit_checkpoint
    from fedbip_ray.runtime.messages import ServerSettings
    from fedbip_ray.runtime.server import ServerActor

    from ..conftest import tiny_config

    server = ServerActor.remote(ServerSettings.of("fedavg", {}, 3))
    ray_get = __import__("ray").get
    layout = Layout.from_shapes({"w": (5,)})
    ray_get(server.initialize.remote(np.arange(5, dtype=np.float32), layout))
    ctx = RunContext(config_from_dict(tiny_config()), tmp_path / "run", None, server=server)
    writer = ctx.checkpoints = CheckpointWriter()
    ctx.history = [{"round": 1}]
    submit_checkpoint(ctx, 1)
    ctx.history.append({"round": 2})  # the write in flight keeps its own copy of the history
    submit_checkpoint(ctx, 2)  # waits for round 1's write first
    assert writer.wait().name.endswith("2")
    latest = read_latest(tmp_path / "run" / "checkpoints")
    assert latest.round == 2 and [r["round"] for r in latest.history] == [1, 2]
    np.testing.assert_array_equal(latest.tensors["states"],
                                  np.tile(np.arange(5, dtype=np.float32), (3, 1)))
    # a failed write is raised by the next wait (here: the checkpoint root is a file)
    ctx.output = tmp_path / "blocked"
    ctx.output.mkdir()
    (ctx.output / "checkpoints").write_text("not a directory")
    submit_checkpoint(ctx, 3)
    with pytest.raises(OSError):
        writer.wait()
    writer.close()


def test_checkpoint_every_k_rounds_resumes_from_the_last_one_written(ray_local, tmp_path,
                                                                     tmp_path_factory):
    """federation.checkpoint_every=2 over 3 rounds writes rounds 2 and 3 only; the cadence
    does not change the trajectory, and a run cut after round 2's checkpoint resumes to the
    same bits."""
    import shutil

    from fedbip_ray.config import config_from_dict
    from fedbip_ray.runtime.federation import run_federation

    clean_out = clean_run(tmp_path_factory)[1]
    cfg = config_from_dict(clean_config(), ["federation.checkpoint_every=2"])
    out = tmp_path / "every2"
    run_federation(cfg, out, echo=lambda s: None)
    written = sorted(p.name for p in (out / "checkpoints").glob("round_*"))
    assert written == ["round_00002", "round_00003"], written
    assert np.array_equal(final_states(out), final_states(clean_out))

    cut = tmp_path / "cut"  # as if killed during round 3: its checkpoint and summary never written
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "round_00003")
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "latest.json").write_text(
        json.dumps({"round": 2, "path": "round_00002"}))
    messages: list[str] = []
    run_federation(cfg, cut, resume=True, echo=messages.append)
    assert any("continuing at round 3" in m for m in messages), messages
    assert [r["round"] for r in rows(cut)] == [1, 2, 3]
    assert np.array_equal(final_states(cut), final_states(clean_out))
