"""End to end: `fedbip run` SIGKILLed at random moments (start-up, mid-round, mid-checkpoint),
resumed each time with `fedbip run CONFIG --resume DIR`, ends exactly like an uninterrupted run;
a finished run can then be extended by more rounds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from ..conftest import REPO, clean_config, clean_run, kill_tree

pytestmark = pytest.mark.e2e
FEDBIP = str(REPO / ".venv" / "bin" / "fedbip")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fedbip(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([FEDBIP, "run", *args], cwd=REPO, env=_env(), stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)




def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def states(out: Path) -> np.ndarray:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / latest["path"] / "server.safetensors"))["states"]


def test_random_sigkills_then_resume_end_like_an_uninterrupted_run(ray_local, tmp_path,
                                                                    tmp_path_factory):
    rounds = clean_config()["federation"]["rounds"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(clean_config()))
    log = tmp_path / "log.txt"
    clean = clean_run(tmp_path_factory)[1]

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills = []
    for attempt in range(4):
        args = [str(config), "--output", str(out)] + (["--resume", str(out)] if attempt else [])
        proc = fedbip(*args, log=log)
        time.sleep(rng.uniform(2.0, 18.0))
        if proc.poll() is not None:  # finished before the kill
            break
        kill_tree(proc)
        kills.append(json.loads((out / "checkpoints" / "latest.json").read_text())["round"]
                     if (out / "checkpoints" / "latest.json").exists() else 0)
    proc = fedbip(str(config), "--resume", str(out), log=log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert kills, "every attempt finished before its kill"

    want = json.loads((clean / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert got["per_client_accuracy"] == want["per_client_accuracy"], kills
    assert [r["round"] for r in rows(out)] == list(range(1, rounds + 1))
    assert np.array_equal(states(out), states(clean))

    # a finished run resumed with more rounds continues where it ended
    more = f"federation.rounds={rounds + 1}"
    proc = fedbip(str(config), "--resume", str(out), "--set", more, log=log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert [r["round"] for r in rows(out)] == list(range(1, rounds + 2))
    assert [r["per_client_accuracy"] for r in rows(out)][:rounds] == \
        [r["per_client_accuracy"] for r in rows(clean)]
