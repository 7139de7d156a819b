"""Per-round outputs bounded in the number of participants: the server's report and the metrics
row grow at most linearly, the matrices go to one compressed npz per round (local and on an
S3-protocol server), heatmaps keep a fixed size, MLflow gets quantiles beyond the per-client
limit; the server actor's CPUs are counted by the sizing and set its BLAS threads."""

from __future__ import annotations

import json
import pickle
import struct
import uuid

import numpy as np
import pytest

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.core.matrix_view import VIEW_CELLS
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import FULL_MATRIX_MAX, ClientUpdate, ServerSettings, block_view
from fedbip_ray.runtime.outputs import RunOutputs, read_round_matrices
from fedbip_ray.runtime.rows import round_row
from fedbip_ray.runtime.server import FederatedServer
from fedbip_ray.storage import open_location
from fedbip_ray.tracking.plots import VIEW_FIGSIZE, heatmap_png
from fedbip_ray.tracking.run_info import row_metrics

LAYOUT = Layout.from_shapes({"a": (6,), "b": (2, 5)})
D = LAYOUT.size
GROUPS = 4


def grouped_updates(n: int, seed: int = 0) -> tuple[list[ClientUpdate], list[int]]:
    """``n`` updates in ``GROUPS`` groups of parallel task vectors (plus a little noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((GROUPS, D)).astype(np.float32)
    groups = [i % GROUPS for i in range(n)]
    ups = [ClientUpdate(i, 1, centers[g] + 0.05 * rng.standard_normal(D).astype(np.float32),
                        LAYOUT, 10) for i, g in enumerate(groups)]
    return ups, groups


def aggregate(n: int, output=None, top_k: int = 8):
    ups, groups = grouped_updates(n)
    srv = FederatedServer(ServerSettings.of("fedbip", {}, n, groups, output=output, top_k=top_k))
    srv.initialize(np.zeros(D, dtype=np.float32), LAYOUT)
    return srv.aggregate(1, ups), groups


def row_of(report, n: int) -> dict:
    evals = {c: {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.5, "loss": 1.0}}
             for c in range(n)}
    return round_row(1, evals, report, list(range(n)), [], 1.0)


def test_report_and_row_size_are_flat_in_n():
    sizes = {}
    for n in (8, 256, 2000):
        report, _ = aggregate(n)
        assert report.aggregated and report.summary is not None
        assert report.summary.neighbors.shape == (n, min(8, n - 1))
        assert len(report.summary.view.labels) == min(n, VIEW_CELLS)
        assert (report.weights is None) == (n > FULL_MATRIX_MAX)
        sizes[n] = (len(pickle.dumps(report)), len(json.dumps(row_of(report, n))))
    quad = (2000 / 256) ** 2
    for which in (0, 1):
        assert sizes[2000][which] / sizes[256][which] < quad / 4, sizes
    assert sizes[2000][0] < 2000 * 2000 * 4 / 10  # far below one float32 matrix


def test_top_k_neighbours_are_the_own_group():
    report, groups = aggregate(256)
    s = report.summary
    assert s is not None and s.neighbor_similarity is not None
    own = np.asarray(groups)[s.neighbors] == np.asarray(groups)[:, None]
    assert own.mean() > 0.95
    assert not (s.neighbors == np.arange(256)[:, None]).any()  # self is excluded
    assert (np.diff(s.neighbor_weights, axis=1) <= 1e-7).all()  # largest weights first


def test_npz_round_trip_locally_and_jsonl_only_for_small_rounds(tmp_path):
    out = RunOutputs.open(tmp_path / "run")
    for n in (8, 200):
        report, _ = aggregate(n, output=out.location)
        report.round = n  # distinct rounds in one output
        assert report.summary is not None and report.summary.file == "similarity/round_00001.npz"
        got = read_round_matrices(out.location, 1)
        assert got.clients.tolist() == list(range(n)) and got.weights.dtype == np.float32
        assert got.similarity is not None and got.similarity.shape == (n, n)
        assert np.allclose(got.weights.sum(axis=1), 1.0, atol=1e-5)
        if report.similarity is not None:
            assert np.allclose(got.similarity, report.similarity, atol=1e-6)
        out.record_round(row_of(report, n), report)
    lines = (tmp_path / "run" / "similarity.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [8]  # the 200-client round: npz only
    out.prepare([], 0, fresh=False)
    assert not (tmp_path / "run" / "similarity" / "round_00001.npz").exists()


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto")
    from tests.e2e.s3server import MotoS3

    server = MotoS3(buckets=("runs",)).start()
    try:
        yield server
    finally:
        server.stop()


def test_npz_round_trip_on_an_s3_store(s3_server, monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env("admin").items():
        monkeypatch.setenv(name, value)
    uri = f"s3://runs/t-{uuid.uuid4().hex[:10]}"
    report, _ = aggregate(300, output=open_location(uri))
    got = read_round_matrices(uri, 1)
    assert got.clients.shape == (300,) and got.weights.shape == (300, 300)
    assert report.summary is not None and report.summary.file is not None
    assert (open_location(uri) / report.summary.file).exists()


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_heatmap_at_500_clients_has_a_fixed_size_and_shows_the_groups(tmp_path):
    n = 500
    ups, groups = grouped_updates(n)
    vecs = np.stack([u.vector for u in ups]).astype(np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sim = vecs @ vecs.T
    expect = (int(VIEW_FIGSIZE[0] * 110), int(VIEW_FIGSIZE[1] * 110))
    for g in (np.asarray(groups), None):
        path = tmp_path / f"h{g is None}.png"
        heatmap_png(sim, list(range(n)), "cosine", path, groups=g)
        assert abs(png_size(path)[0] - expect[0]) <= 2 and abs(png_size(path)[1] - expect[1]) <= 2
    view = block_view(sim, sim, None)
    assert view.similarity is not None and view.similarity.shape == (VIEW_CELLS, VIEW_CELLS)
    # sorted by a clustering order, near-diagonal blocks hold one group: high mean cosine
    assert float(np.mean(np.diagonal(view.similarity))) > 0.9


def test_quantiles_instead_of_per_client_metrics_beyond_the_limit():
    row = {"round": 1, "seconds": 1.0, "bytes_in": 0, "bytes_out": 0, "accepted": [],
           "failed": {}, "rejected": {}, "stragglers": [],
           "per_client_accuracy": {str(c): c / 149 for c in range(150)}}
    many = row_metrics(row, [row], per_client_limit=100)
    assert not any(k.startswith("client_0") for k in many)
    assert many["client_accuracy_min"] == 0.0 and many["client_accuracy_max"] == 1.0
    assert abs(many["client_accuracy_p50"] - 0.5) < 1e-9
    few = row_metrics(row, [row], per_client_limit=200)
    assert few["client_0149_accuracy"] == 1.0 and "client_accuracy_p50" not in few


def test_mlflow_logs_quantiles_and_a_histogram(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fedbip_ray.runtime.context import RunContext
    from fedbip_ray.tracking.mlflow_logger import MlflowCallback

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config.model_validate({"tracking": {"tracking_uri": uri,
                                              "per_client_metrics_limit": 10}})
    cb = MlflowCallback(cfg)
    cb.client = MlflowClient(tracking_uri=uri)
    cb.run_id = cb.client.create_run(cb.client.create_experiment("t")).info.run_id
    report, _ = aggregate(100)
    row = row_of(report, 100)
    ctx = RunContext(cfg, tmp_path, None, history=[row])  # type: ignore[arg-type]
    cb.on_round(ctx, row, report)
    data = cb.client.get_run(cb.run_id).data
    assert "client_accuracy_p90" in data.metrics
    assert not any(k.startswith("client_00") for k in data.metrics)
    plots = [f.path for f in cb.client.list_artifacts(cb.run_id, "plots")]
    mats = [f.path for f in cb.client.list_artifacts(cb.run_id, "matrices")]
    assert plots == ["plots/client_accuracy_round_00001.png"]
    assert "matrices/similarity_round_00001.png" in mats  # block view: 100 > FULL_MATRIX_MAX
    assert not any(p.endswith(".json") for p in mats)


def cfg_with(**resources) -> Config:
    return Config.model_validate({"data": {"num_clients": 4}, "resources": resources})


def test_sizing_leaves_the_servers_cpus():
    from fedbip_ray.runtime.cluster import plan_actors

    assert plan_actors(cfg_with(), {"CPU": 4.0}) == 4
    assert plan_actors(cfg_with(server_cpus=2), {"CPU": 4.0}) == 2
    with pytest.raises(ConfigError, match="server_cpus=2: the server and one client") as err:
        plan_actors(cfg_with(server_cpus=2), {"CPU": 2.0})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="server_memory_gb=8"):
        plan_actors(cfg_with(server_memory_gb=8), {"CPU": 2.0, "memory": 2.0 * 2**30})


def test_server_actor_sets_its_blas_threads(ray_local):
    from fedbip_ray.runtime.server import ServerActor

    pytest.importorskip("threadpoolctl")
    settings = ServerSettings.of("fedavg", {}, 2)
    actors = [ServerActor.options(num_cpus=0).remote(settings, t) for t in (1, 2)]
    try:
        assert ray_local.get([a.blas_threads.remote() for a in actors]) == [1, 2]
    finally:
        for a in actors:
            ray_local.kill(a)


def test_the_server_actor_writes_the_matrices_not_the_driver(ray_local, tmp_path):
    from fedbip_ray.runtime.server import ServerActor

    n = 100
    ups, groups = grouped_updates(n)
    out = open_location(tmp_path / "run")
    settings = ServerSettings.of("fedbip", {}, n, groups, output=out)
    actor = ServerActor.options(num_cpus=0).remote(settings, 1)
    try:
        ray_local.get(actor.initialize.remote(np.zeros(D, dtype=np.float32), LAYOUT))
        refs = [ray_local.put(u) for u in ups]
        report = ray_local.get(actor.aggregate_refs.remote(1, list(range(n)), refs))
    finally:
        ray_local.kill(actor)
    assert report.similarity is None and report.weights is None  # 100 > FULL_MATRIX_MAX
    got = read_round_matrices(tmp_path / "run", 1)
    assert got.clients.tolist() == list(range(n)) and got.similarity is not None
    assert report.summary is not None and report.summary.neighbors.shape == (n, 8)


def test_server_options_and_the_driver_node_check(ray_local, tmp_path):
    from fedbip_ray.runtime.cluster import check_server_fits, server_options

    opts = server_options(cfg_with(server_cpus=1.5, server_memory_gb=0.5),
                          open_location(tmp_path))
    assert opts["num_cpus"] == 1.5 and opts["memory"] == 2**29 and "runtime_env" not in opts
    check_server_fits(cfg_with(server_cpus=2))  # the local node has 2 CPUs
    with pytest.raises(ConfigError, match="server_cpus=3: the server actor runs on the driver"):
        check_server_fits(cfg_with(server_cpus=3))
