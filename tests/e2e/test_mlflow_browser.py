"""The MLflow UI as a user sees it: a tiny federation tracked by a real `mlflow server`, its run
page rendered by headless Chromium (DOM and screenshot): metrics, datasets, description,
the similarity heatmap and every client's adapter in the artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.tracking.mlflow_logger import MlflowCallback

from ..conftest import tiny_config

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")]
ROUNDS = 2
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1400,1000", "--virtual-time-budget=15000"]


def render(url: str, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` after the page's scripts ran (and a PNG of it, if asked), in a fresh
    Chromium profile."""
    profile = tempfile.mkdtemp(prefix="fbchr", dir="/tmp")
    try:
        extra = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HOME": profile})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)




@pytest.fixture(scope="module")
def page(ray_local, mlflow_server, tmp_path_factory):
    """(callback, run page URL) of one tiny federation tracked on the server."""
    cfg = config_from_dict(tiny_config(
        name="dashboard", federation={"rounds": ROUNDS},
        tracking={"mlflow": True, "tracking_uri": mlflow_server.uri, "experiment": "browser"}))
    cb = MlflowCallback(cfg)
    run_federation(cfg, tmp_path_factory.mktemp("dash"), callbacks=[cb], echo=lambda s: None)
    where = cb.where_to_look()
    assert where is not None
    return cb, where.split(": ", 1)[1]


def artifact_url(run_url: str, path: str) -> str:
    base, query = run_url.split("?", 1)
    return f"{base}/artifacts/{path}?{query}"


def test_run_page_shows_metrics_datasets_and_description(page, tmp_path):
    cb, url = page
    assert "?workflowType=machine_learning" in url
    dom = render(url)
    for text in ("Finished", "Model training", "mean_accuracy", "worst10_accuracy",
                 "Datasets", "client_0000", "dashboard", "synthetic-text"):
        assert text in dom, text
    shot = tmp_path / "run.png"
    render(url, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_artifacts_show_the_heatmap_and_every_adapter(page):
    cb, url = page
    heatmap = f"matrices/similarity_round_{ROUNDS:05d}.png"
    dom = render(artifact_url(url, heatmap))
    assert f'alt="{heatmap}"' in dom  # the PNG is rendered inline
    assert "adapters" in dom and "plots" in dom
    dom = render(artifact_url(url, "adapters/client_0000/adapter_config.json"))
    for cid in range(cb.cfg.data.num_clients):
        assert f"client_{cid:04d}" in dom
    assert "adapter_model.safetensors" in dom and "peft_type" in dom
