"""Federations on a real local Ray (tiny random-init BERT, synthetic text)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.core.gate import choose_mix, pool_rounds
from fedbip_ray.core.strategies import make_strategy
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.rows import past_gate_scores, sample_clients

from ..conftest import tiny_config

TIES = make_strategy("fedbip", {}).client_options.gate_ties  # the default tie rule


def _gate_scores(entries: list[list[float]]) -> list[dict[str, float]]:
    """metrics.jsonl gate scores ``[accuracy, n, loss, loss_sd]`` per mix as the gate reads them
    (every classifier score carries its loss spread)."""
    assert all(len(e) == 4 and e[3] is not None and e[3] >= 0 for e in entries)
    return [{"accuracy": a, "n": n, "loss": loss, "loss_sd": sd} for a, n, loss, sd in entries]


pytestmark = pytest.mark.ray


def _states(out) -> np.ndarray:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(str(out / "checkpoints" / latest["path"] / "server.safetensors"))["states"]


def _run(tmp_path, name, **sections):
    cfg = config_from_dict(tiny_config(**sections))
    out = tmp_path / name
    return run_federation(cfg, out, echo=lambda s: None), out


def test_fedbip_personalizes_and_fedavg_does_not(ray_local, tmp_path):
    rounds = {"rounds": 3}
    s_bip, out_bip = _run(tmp_path, "bip", federation=rounds)
    s_avg, out_avg = _run(tmp_path, "avg", federation=rounds, strategy={"name": "fedavg"})
    bip, avg = _states(out_bip), _states(out_avg)
    assert bip.shape == avg.shape and bip.shape[0] == 4
    # fedavg: one global adapter; fedbip: every client its own
    assert np.allclose(avg, avg[0:1], atol=1e-6)
    # clients 0, 2 (group 0) and 1, 3 (group 1) hold conflicting labels: different adapters
    assert min(np.abs(bip[i] - bip[j]).max() for i in (0, 2) for j in (1, 3)) > 1e-4
    # contract files
    summary = json.loads((out_bip / "summary.json").read_text())
    assert summary == s_bip
    for key in ("strategy", "rounds_completed", "mean_accuracy", "worst10_accuracy",
                "per_client_accuracy", "wall_seconds"):
        assert key in summary
    assert summary["rounds_completed"] == 3
    rows = [json.loads(line) for line in (out_bip / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]["per_client_accuracy"]) == {"0", "1", "2", "3"}
    assert (out_bip / "config.yaml").is_file()
    # the default fedbip gates every aggregated client on its validation split
    for r in rows:
        assert 0 < r["extra"]["train_step_seconds"] < r["seconds"]
        assert r["extra"]["client_peak_rss_mib"] > 100  # a client actor holding a model
        phases = [r["extra"][f"{p}_seconds"] for p in ("fit", "aggregate", "gate", "eval")]
        assert min(phases) > 0 and sum(phases) <= r["seconds"]  # the round's wall time, split
        assert set(r["gate_mix"]) == {"0", "1", "2", "3"}
        assert set(r["gate_mix"].values()) <= {1.0, 0.5, 0.0}
        assert r["extra"]["gate_mean_mix"] == pytest.approx(np.mean(list(r["gate_mix"].values())))
        for c, scores in r["gate_scores"].items():  # this round's evidence decided (no memory)
            assert r["gate_mix"][c] == choose_mix(_gate_scores(scores), (1.0, 0.5, 0.0), TIES)
        # each participant is sent its state to train and its aggregate to gate (the actor that
        # ran its fit kept its own; a call taken by another actor is sent it too)
        sent = r["extra"]["gate_locals_sent"]
        assert 0 <= sent <= 2 * len(r["accepted"])
        sends = len(r["participants"]) + len(r["accepted"]) + sent
        assert r["bytes_out"] == 4 * bip.shape[1] * sends
    avg_rows = (out_avg / "metrics.jsonl").read_text().splitlines()
    assert all("gate_mix" not in json.loads(x) for x in avg_rows)
    # clients with conflicting labels: personalization beats one global model
    assert s_bip["mean_accuracy"] > s_avg["mean_accuracy"] + 0.15


def test_conflicting_groups_get_weight_inside_their_group(ray_local, tmp_path):
    """Also: a gate with memory decides on the evidence of every round so far (exact accuracy
    ties broken by the default rule, pooled losses and spreads included)."""
    _, out = _run(tmp_path, "grp", federation={"rounds": 3},
                  strategy={"name": "fedbip", "params": {"reference": "pretrained",
                                                         "gate_memory": 1.0}})
    lines = [json.loads(x) for x in (out / "similarity.jsonl").read_text().splitlines()]
    last = lines[-1]
    w = np.asarray(last["weights"])
    groups = np.asarray(last["clients"]) % 2
    same = groups[:, None] == groups[None, :]
    share = (w * same).sum(axis=1)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert share.min() > 0.6, share
    s = np.asarray(last["similarity"])
    off = ~np.eye(len(s), dtype=bool)
    assert s[same & off].mean() > s[~same].mean()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["extra"]["group_in_group_weight_share"] == pytest.approx(share.mean())
    assert row["extra"]["group_adjusted_rand_index"] == pytest.approx(1.0)
    mixes = (1.0, 0.5, 0.0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for t, r in enumerate(rows):
        for c in ("0", "1", "2", "3"):
            rounds = [_gate_scores(x["gate_scores"][c]) for x in rows[: t + 1]]
            assert r["gate_mix"][c] == choose_mix(pool_rounds(rounds, 1.0), mixes, TIES)
    assert past_gate_scores(rows, mixes)[0][2] == _gate_scores(rows[2]["gate_scores"]["0"])
    assert past_gate_scores(rows, (1.0, 0.0)) == {}  # other mixes: not the same evidence


def test_partial_participation_keeps_absent_clients(ray_local, tmp_path):
    summary, out = _run(tmp_path, "part", federation={"rounds": 2, "clients_per_round": 2})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["participants"]) == 2 for r in rows)
    seen = set().union(*[set(r["participants"]) for r in rows])
    states = _states(out)
    init = load_file(str(out / "checkpoints" / json.loads(
        (out / "checkpoints" / "latest.json").read_text())["path"] / "server.safetensors"))["init"]
    for cid in set(range(4)) - seen:
        assert np.array_equal(states[cid], init)
    assert summary["rounds_completed"] == 2


def test_sampling_is_seeded():
    assert sample_clients(10, 3, 0, 1) == sample_clients(10, 3, 0, 1)
    # the sample changes with the round and with the seed
    assert sample_clients(10, 3, 0, 1) != sample_clients(10, 3, 0, 2)
    assert len({tuple(sample_clients(10, 3, 0, r)) for r in range(1, 11)}) >= 5
    assert sample_clients(10, 3, 1, 1) != sample_clients(10, 3, 0, 1)
    assert all(len(set(sample_clients(10, 3, 0, r))) == 3 for r in range(1, 11))
    assert sample_clients(4, 8, 0, 1) == [0, 1, 2, 3]


def test_ia3_adapter_is_pluggable(ray_local, tmp_path):
    summary, out = _run(tmp_path, "ia3", federation={"rounds": 1},
                        model={"peft": {"method": "ia3"}})
    assert summary["rounds_completed"] == 1
    assert _states(out).shape[0] == 4


def test_gpu_request_on_cpu_cluster_fails_fast(ray_local, tmp_path):
    cfg = config_from_dict(tiny_config(resources={"num_gpus_per_client": 1}))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="num_gpus_per_client=1: the Ray cluster has 0 GPUs"):
        run_federation(cfg, tmp_path / "gpu", echo=lambda s: None)
    assert time.perf_counter() - t0 < 60


def test_gradient_reference_sends_a_signal_beside_each_task_vector(ray_local, tmp_path):
    summary, out = _run(tmp_path, "grad", federation={"rounds": 2},
                        strategy={"name": "fedbip",
                                  "params": {"reference": "gradient", "gate": []}})
    assert summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["accepted"] == [0, 1, 2, 3] and not r["rejected"]
        # bytes_out: one state per client; bytes_in: task vector + gradient signal per client
        assert r["bytes_in"] == 2 * r["bytes_out"]
    sims = [json.loads(x) for x in (out / "similarity.jsonl").read_text().splitlines()]
    s = np.asarray(sims[-1]["similarity"])
    assert s.shape == (4, 4) and np.isfinite(s).all()
