"""FedSA-LoRA, FedAWA and exact LoRA aggregation through a real federation on local Ray.

Round 1 of every run starts from the same initial adapter and trains each client with the
same seed, so a ``local`` run gives every client's trained state ``θₖ`` of that round and each
strategy's states can be checked against its rule applied to them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedbip_ray.config import config_from_dict
from fedbip_ray.core.lora import lora_factor_pairs
from fedbip_ray.core.peers import shared_columns
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

ONE_ROUND = {"rounds": 1}


def _run(tmp_path, name: str, strategy: dict) -> tuple[np.ndarray, Layout, object]:
    """(states (N, D), layout, output dir) after one round of ``strategy``."""
    cfg = config_from_dict(tiny_config(strategy=strategy, federation=ONE_ROUND))
    out = tmp_path / name
    run_federation(cfg, out, echo=lambda s: None)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    ck = out / "checkpoints" / latest["path"]
    layout = Layout.from_dict(json.loads((ck / "layout.json").read_text()))
    return load_file(str(ck / "server.safetensors"))["states"], layout, out


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """Every client's state after its round-1 training (``local``), and the layout."""
    states, layout, _ = _run(tmp_path_factory.mktemp("local"), "local", {"name": "local"})
    return states, layout


def _lora_mask(layout: Layout) -> np.ndarray:
    mask = np.zeros(layout.size, dtype=bool)
    for p in lora_factor_pairs(layout):
        mask[p.a] = mask[p.b] = True
    return mask


def test_fedsa_lora_shares_a_keeps_b_and_head(trained, tmp_path) -> None:
    theta, layout = trained
    sa, _, _ = _run(tmp_path, "fedsa", {"name": "fedsa-lora"})
    avg, _, _ = _run(tmp_path, "fedavg", {"name": "fedavg"})
    a_cols = shared_columns(layout, modules_to_save=False)
    own = np.setdiff1d(np.arange(layout.size), a_cols)
    assert a_cols.size > 0 and own.size > 0
    assert np.isfinite(sa).all()
    # every client's A factors: the same example-weighted mean as FedAvg's
    assert np.allclose(sa[:, a_cols], sa[0:1, a_cols], atol=0)
    assert np.allclose(sa[:, a_cols], avg[:, a_cols], atol=1e-6)
    # B factors, head and embeddings: the client's own trained values
    assert np.allclose(sa[:, own], theta[:, own], atol=1e-6)
    assert min(np.abs(sa[i, own] - sa[j, own]).max() for i in range(4) for j in range(i)) > 1e-4


def test_fedawa_gives_every_client_the_same_state(trained, tmp_path) -> None:
    theta, _ = trained
    aw, _, _ = _run(tmp_path, "fedawa", {"name": "fedawa"})
    assert np.isfinite(aw).all()
    assert np.array_equal(aw, np.repeat(aw[0:1], 4, axis=0))
    # a convex combination of the trained clients, not any one of them
    assert all(np.abs(aw[0] - theta[k]).max() > 1e-4 for k in range(4))
    assert np.all(aw[0] <= theta.max(axis=0) + 1e-5) and np.all(aw[0] >= theta.min(axis=0) - 1e-5)


def test_lora_exact_changes_states_to_the_truncated_delta_w_sum(trained, tmp_path) -> None:
    theta, layout = trained
    params = {"gate": [], "lora_exact": True}
    ex, _, out = _run(tmp_path, "exact", {"name": "fedbip", "params": params})
    sim = json.loads((out / "similarity.jsonl").read_text().splitlines()[-1])
    order = np.asarray(sim["clients"])
    w = np.zeros((4, 4))
    w[np.ix_(order, order)] = np.asarray(sim["weights"])
    assert np.isfinite(ex).all()
    plain = (w @ theta.astype(np.float64)).astype(np.float32)  # lora_exact false, same weights
    lora = _lora_mask(layout)
    assert np.allclose(ex[:, ~lora], plain[:, ~lora], atol=1e-5)
    assert np.abs(ex[:, lora] - plain[:, lora]).max() > 1e-4
    for p in lora_factor_pairs(layout):
        b = theta[:, p.b].astype(np.float64).reshape(4, p.d_out, p.r)
        a = theta[:, p.a].astype(np.float64).reshape(4, p.r, p.d_in)
        for i in range(4):
            target = np.einsum("k,kij->ij", w[i], b @ a)
            u, s, vt = np.linalg.svd(target)
            best = (u[:, :p.r] * s[:p.r]) @ vt[:p.r]
            got_b = ex[i, p.b].reshape(p.d_out, p.r).astype(np.float64)
            got = got_b @ ex[i, p.a].reshape(p.r, p.d_in).astype(np.float64)
            assert np.allclose(got, best, atol=1e-5 * max(1.0, s[0]))
