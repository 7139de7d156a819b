"""What the client side of FedProx, FedAMP, FedAvg-FT and IA3 does to training, measured on
real federations (local Ray, tiny random-init BERT, synthetic text) and a real trainer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import ray
import torch

from fedbip_ray.config import config_from_dict
from fedbip_ray.core.weights import fedamp_weights
from fedbip_ray.data.shards import build_shards, read_shard
from fedbip_ray.runtime.cluster import spawn_client
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.messages import ShardRef
from fedbip_ray.training.registry import make_trainer

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

PROX_MU = 10.0  # with the tiny config's AdamW (lr 0.02, 3 epochs) a task vector ~7x shorter


@dataclass
class Recorder:
    """Run callback: the server's states (N, D) before round 1 and after every round, and each
    round's accepted task vectors (N_t, D) with their client ids."""

    states: list[np.ndarray] = field(default_factory=list)
    taus: list[np.ndarray] = field(default_factory=list)
    clients: list[list[int]] = field(default_factory=list)

    def on_start(self, ctx: Any) -> None:
        ray.get(ctx.server.keep_last_round.remote())
        self.states.append(ray.get(ctx.server.all_states.remote()))

    def on_round(self, ctx: Any, row: Any, report: Any) -> None:
        last = ray.get(ctx.server.last_round.remote())
        self.taus.append(np.asarray(last["deltas"]))
        self.clients.append(list(last["clients"]))
        self.states.append(ray.get(ctx.server.all_states.remote()))

    def on_end(self, ctx: Any, summary: dict[str, Any]) -> None:
        pass

    def norms(self) -> np.ndarray:
        """(rounds, N) L2 norm of every client's task vector."""
        return np.stack([np.linalg.norm(t, axis=1) for t in self.taus])


def _run(tmp_path, name: str, **sections) -> tuple[dict, Recorder, list[dict]]:
    cfg = config_from_dict(tiny_config(**sections))
    rec = Recorder()
    out = tmp_path / name
    summary = run_federation(cfg, out, callbacks=[rec], echo=lambda s: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rec, rows


def _strategy(name: str, **params) -> dict:
    return {"name": name, "params": params}


def test_fedprox_pulls_the_trained_state_to_the_received_one(ray_local, tmp_path):
    fed = {"rounds": 2}
    _, free, _ = _run(tmp_path, "mu0", federation=fed,
                      strategy=_strategy("fedprox", prox_mu=0.0))
    _, prox, _ = _run(tmp_path, "mu", federation=fed,
                      strategy=_strategy("fedprox", prox_mu=PROX_MU))
    assert free.clients == prox.clients == [[0, 1, 2, 3]] * 2
    # round 1 starts at init, round 2 at the FedAvg state (not init): both pulled back
    assert not np.allclose(prox.states[1], prox.states[0])
    ratio = prox.norms() / free.norms()
    assert (free.norms() > 0).all()
    assert ratio.max() < 0.5, ratio


def test_the_proximal_anchor_is_the_received_state(ray_local, tmp_path):
    """A client actor trained from a state far from the adapter's init stays near that state."""
    cfg = config_from_dict(tiny_config())
    shards = build_shards(cfg.data, cfg.seed, tmp_path / "shards")
    actor = spawn_client(cfg, shards.num_labels)
    try:
        init = ray.get(actor.initial_state.remote())
        rng = np.random.default_rng(0)
        received = init + rng.normal(0.0, 0.05, init.shape).astype(np.float32)
        shard = ShardRef(0, ray.put(shards.paths[0].read_bytes()))
        free, prox = ray.get([actor.fit.remote(0, received, 1, mu, shard) for mu in (0.0, PROX_MU)])
    finally:
        ray.kill(actor)
    n_free, n_prox = np.linalg.norm(free.vector), np.linalg.norm(prox.vector)
    assert 0 < n_prox < 0.5 * n_free, (n_prox, n_free)
    assert n_prox < 0.1 * np.linalg.norm(received - init)  # not pulled back towards init


def test_fedamp_trains_towards_its_attention_weighted_cloud_model(ray_local, tmp_path):
    amp = {"sigma": 100.0, "alpha_k": 10.0}  # task vectors of norm ~3: distances^2 ~ 10..100
    fed = {"rounds": 2}
    _, free, _ = _run(tmp_path, "amp0", federation=fed,
                      strategy=_strategy("fedamp", prox_mu=0.0, **amp))
    _, prox, _ = _run(tmp_path, "amp", federation=fed,
                      strategy=_strategy("fedamp", prox_mu=PROX_MU, **amp))
    for rec in (free, prox):
        for r, tau in enumerate(rec.taus):
            # the server's new states: u_i = sum_j xi_ij theta_j over theta = received + tau
            theta = rec.states[r] + tau
            xi = fedamp_weights(theta, sigma=amp["sigma"], alpha_k=amp["alpha_k"])
            assert np.allclose(rec.states[r + 1], xi @ theta, atol=1e-6)
            off = xi[~np.eye(len(xi), dtype=bool)]
            assert off.min() > 1e-3  # every peer takes part: not local training
    # each client gets its own cloud model: not one global model
    assert np.abs(free.states[2] - free.states[2][0:1]).max() > 1e-6
    # the proximal term pulls towards the received (personalized) cloud model in round 2
    ratio = prox.norms() / free.norms()
    assert ratio.max() < 0.5, ratio


def test_fedavg_ft_fine_tunes_before_evaluation_only(ray_local, tmp_path):
    fed = {"rounds": 1}
    _, avg, rows_avg = _run(tmp_path, "avg", federation=fed, strategy=_strategy("fedavg"))
    _, ft, rows_ft = _run(tmp_path, "ft", federation=fed,
                          strategy=_strategy("fedavg-ft", finetune_epochs=2))
    # the same training and aggregation: the server's states are not touched by the fine-tune
    assert np.array_equal(avg.taus[0], ft.taus[0])
    assert np.array_equal(avg.states[-1], ft.states[-1])
    assert np.allclose(ft.states[-1], ft.states[-1][0:1])  # still one global model
    a, f = rows_avg[-1], rows_ft[-1]
    # ... but what is evaluated is each client's fine-tuned copy
    assert a["per_client_accuracy"] != f["per_client_accuracy"]
    assert abs(a["test_loss"] - f["test_loss"]) > 1e-3


def _ia3_trainer(tmp_path):
    cfg = config_from_dict(tiny_config(
        model={"peft": {"method": "ia3", "modules_to_save": ["classifier"]}},
        data={"num_clients": 2, "examples_per_client": 48}))
    shards = build_shards(cfg.data, cfg.seed, tmp_path / "shards")
    trainer = make_trainer(cfg, shards.num_labels, torch.device("cpu"))
    frames = read_shard(shards.paths[0].read_bytes())
    return trainer, trainer.encode(frames["train"])


def test_ia3_trains_its_vectors_and_head_only(tmp_path):
    trainer, data = _ia3_trainer(tmp_path)
    names = trainer.layout.names
    assert any("ia3_l" in n for n in names)
    assert all("ia3_l" in n or "modules_to_save" in n for n in names), names
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    loss0 = trainer.evaluate(data)["loss"]
    init = trainer.current_state()
    trainer.train(data, 8, seed=0)
    assert trainer.evaluate(data)["loss"] < loss0 - 0.01
    changed = {k for k, v in trainer.model.named_parameters()
               if not torch.equal(v.detach(), before[k])}
    assert any("ia3_l" in k for k in changed)  # the IA3 vectors themselves learn
    assert all("ia3_l" in k or "modules_to_save" in k for k in changed), changed
    delta = trainer.current_state() - init
    lay = trainer.layout
    moved = {n for n, o, s in zip(lay.names, lay.offsets, lay.shapes, strict=True)
             if np.abs(delta[o:o + int(np.prod(s))]).max() > 0}
    assert any("ia3_l" in n for n in moved)
