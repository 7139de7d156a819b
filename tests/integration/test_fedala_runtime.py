"""FedALA through a real federation on local Ray: each aggregated client's state becomes its
adaptive local aggregation of its own trained model and the FedAvg global model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedbip_ray.config import config_from_dict
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def _run(tmp_path, strategy: dict, rounds: int = 1) -> tuple[dict, Layout, list[dict]]:
    """(server tensors, layout, metrics rows) after ``rounds`` rounds of ``strategy``."""
    cfg = config_from_dict(tiny_config(strategy=strategy, federation={"rounds": rounds}))
    out = tmp_path / strategy["name"]
    run_federation(cfg, out, echo=lambda s: None)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    ck = out / "checkpoints" / latest["path"]
    layout = Layout.from_dict(json.loads((ck / "layout.json").read_text()))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return load_file(str(ck / "server.safetensors")), layout, rows


def test_fedala_start_states_mix_own_and_global_with_learned_weights(ray_local,
                                                                     tmp_path) -> None:
    ala, layout, rows = _run(tmp_path, {"name": "fedala", "params": {"num_pre_loss": 2,
                                                                     "threshold": 1.0}})
    avg, _, _ = _run(tmp_path, {"name": "fedavg"})
    states, glob = ala["states"], avg["states"][0]
    head = np.asarray([layout.index(n).start for n in layout.names
                       if n.startswith("base_model.model.classifier.")])
    cols = np.concatenate([np.arange(layout.index(n).start, layout.index(n).stop)
                           for n in layout.names if n.startswith("base_model.model.classifier.")])
    assert head.size == 2  # layer_idx 2: the classifier head's weight and bias
    lower = np.setdiff1d(np.arange(layout.size), cols)
    # lower layers: the FedAvg global model (the same training as the fedavg run)
    assert np.allclose(states[:, lower], glob[None, lower], atol=1e-6)
    # higher layers: neither the global model nor one shared state
    assert all(np.abs(states[i, cols] - glob[cols]).max() > 1e-5 for i in range(4))
    assert np.abs(states[0, cols] - states[1, cols]).max() > 1e-5
    # the learned weights are kept per client: in [0, 1], not all 1
    w = ala["memory"]
    assert w.shape == (4, cols.size) and np.isfinite(w).all()
    assert np.all((w >= 0) & (w <= 1)) and (w < 1).any()
    assert rows[0]["round"] == 1
