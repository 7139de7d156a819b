"""FedDPA through a real federation on local Ray: after aggregation every client holds the
same global adapter and its own local adapter; evaluation mixes them per instance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedbip_ray.config import config_from_dict
from fedbip_ray.core.feddpa import adapter_columns
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def test_feddpa_global_adapter_shared_local_adapters_own(ray_local, tmp_path) -> None:
    cfg = config_from_dict(tiny_config(strategy={"name": "feddpa"},
                                       federation={"rounds": 2}, train={"local_epochs": 1}))
    out = tmp_path / "feddpa"
    run_federation(cfg, out, echo=lambda s: None)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    ck = out / "checkpoints" / latest["path"]
    layout = Layout.from_dict(json.loads((ck / "layout.json").read_text()))
    states = load_file(str(ck / "server.safetensors"))["states"]
    glob, loc = adapter_columns(layout, "default"), adapter_columns(layout, "local")
    assert glob.size == loc.size > 0 and states.shape == (4, layout.size)
    # the global adapter: one average for every client
    assert np.all(states[:, glob] == states[:1, glob])
    # the local adapters: each client's own, trained in round 2 (the first round trains the
    # global adapter only)
    assert all(np.abs(states[i, loc] - states[j, loc]).max() > 1e-5
               for i in range(4) for j in range(i + 1, 4))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["mean_accuracy"]) for r in rows)
