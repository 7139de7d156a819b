"""A run on a sharded server (federation.server_shards: 2, one Ray actor per column block and a
coordinator) gives the one-server run's states and scores; a shard actor killed mid-run fails
the run with one line, and --resume continues from the last checkpoint to the same result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from safetensors.numpy import load_file

from fedbip_ray.config import config_from_dict
from fedbip_ray.config_io import RunFailed
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.federation import run_federation

from ..conftest import clean_config, clean_run

pytestmark = pytest.mark.ray


def _sharded_config(shards: int = 2):
    raw = clean_config()
    raw["federation"]["server_shards"] = shards
    return config_from_dict(raw)


def _final(out) -> dict[str, np.ndarray]:
    ck = ckpt_io.read_latest(out / "checkpoints")
    assert ck is not None
    return ck.tensors


class KillShard:
    """Kills server block actor 0 once round ``after`` is recorded."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_start(self, ctx) -> None:
        pass

    def on_round(self, ctx, row, report) -> None:
        if row["round"] == self.after:
            ctx.checkpoints.wait()
            ray.kill(ctx.server.blocks[0])

    def on_end(self, ctx, summary) -> None:
        pass


def test_two_shards_give_the_one_server_run(ray_local, tmp_path, tmp_path_factory):
    clean, clean_out = clean_run(tmp_path_factory)
    summary = run_federation(_sharded_config(), tmp_path / "sharded", echo=lambda s: None)
    assert summary["per_client_accuracy"] == clean["per_client_accuracy"]
    files = {p.name for p in (tmp_path / "sharded" / "checkpoints").glob("round_*/*.safetensors")}
    assert "server_shard_000.safetensors" in files and "server_shard_001.safetensors" in files
    got, ref = _final(tmp_path / "sharded"), _final(clean_out)
    np.testing.assert_allclose(got["states"], ref["states"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["init"], ref["init"])
    shard0 = load_file(str(next((tmp_path / "sharded" / "checkpoints").glob(
        "round_00003/server_shard_000.safetensors"))))
    assert 0 < shard0["states"].shape[1] < ref["states"].shape[1]  # a block of the columns


def test_a_killed_shard_fails_the_run_and_resume_finishes_it(ray_local, tmp_path,
                                                            tmp_path_factory):
    clean, _ = clean_run(tmp_path_factory)
    cfg = _sharded_config()
    out = tmp_path / "killed"
    with pytest.raises(RunFailed, match="server shard") as err:
        run_federation(cfg, out, echo=lambda s: None, callbacks=[KillShard(after=1)])
    assert "\n" not in str(err.value)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 1
    summary = run_federation(cfg, out, resume=True, echo=lambda s: None)
    assert summary["rounds_completed"] == 3
    assert summary["per_client_accuracy"] == clean["per_client_accuracy"]
