"""New clients joining a finished federation (real local Ray, tiny BERT, synthetic text),
through the CLI and the Python API; late joiners inside a run (the server, no Ray)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedbip_ray
from fedbip_ray.cli import main
from fedbip_ray.config import config_from_dict, load_config
from fedbip_ray.core.join import join_aggregate
from fedbip_ray.core.strategies import make_strategy
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.datasets import load_synthetic_text
from fedbip_ray.runtime.messages import ClientUpdate, ServerSettings
from fedbip_ray.runtime.server import FederatedServer

from ..conftest import tiny_config

# "similar users only": an absolute similarity threshold, so a newcomer unlike every stored
# client keeps its own model; one round, so the stored vectors are the clients' own training
STRATEGY = {"name": "fedbip", "params": {"threshold": 0.15, "relative_threshold": False}}


def _newcomers(directory: Path) -> Path:
    """g0: group 0's labels (true sentiment); odd: labels by a neutral word, a rule neither
    group follows."""
    rows = load_synthetic_text(config_from_dict(tiny_config()).data, 0).frame
    rows = rows.sample(200, random_state=7).reset_index(drop=True)
    g0 = rows.iloc[:100].assign(user="g0")
    odd = rows.iloc[100:].assign(user="odd")
    odd["label"] = odd["text"].str.contains(" the ").astype(int)
    path = directory / "new.csv"
    pd.concat([g0, odd]).to_csv(path, index=False)
    return path


def _digest(run: Path) -> str:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    blob = (run / "checkpoints" / latest / "server.safetensors").read_bytes()
    return hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """A finished 2-group label-flip federation (via the Python API), tracked in MLflow."""
    tmp = tmp_path_factory.mktemp("join")
    cfg = tiny_config(federation={"rounds": 1}, strategy=STRATEGY,
                      tracking={"mlflow": True, "tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
    summary = fedbip_ray.run(cfg, output=tmp / "run")
    assert summary["rounds_completed"] == 1
    data = _newcomers(tmp)
    before = _digest(tmp / "run")
    rc = main(["join", str(tmp / "run"), "--data", str(data), "--client-column", "user",
               "--output", str(tmp / "joined")])
    assert rc == 0
    return tmp, before


def _summary(tmp: Path) -> dict[str, dict]:
    entries = json.loads((tmp / "joined" / "summary.json").read_text())["newcomers"]
    return {e["name"]: e for e in entries}


@pytest.mark.ray
def test_newcomer_from_group_0_weighs_group_0(finished):
    tmp, _ = finished
    g0 = _summary(tmp)["g0"]
    groups = [c["group"] for c in json.loads((tmp / "run" / "shards" / "clients.json")
                                             .read_text())["clients"]]
    w = np.asarray(g0["weights"])
    assert g0["peers"][-1] == "self" and len(w) == len(groups) + 1
    assert w.sum() == pytest.approx(1.0)
    on = {g: w[:-1][np.asarray(groups) == g].sum() for g in (0, 1)}
    assert on[0] > 0.5 and on[1] == 0.0, (on, g0["similarity"])
    d = tmp / "joined" / g0["directory"]
    assert (d / "adapter" / "adapter_config.json").is_file()
    assert json.loads((d / "join.json").read_text())["weights"] == g0["weights"]


@pytest.mark.ray
def test_conflicting_newcomer_stays_local(finished):
    tmp, _ = finished
    odd = _summary(tmp)["odd"]
    assert odd["weights"][-1] == pytest.approx(1.0), odd["similarity"]
    assert odd["test"]["accuracy"] == odd["local_test"]["accuracy"]


@pytest.mark.ray
def test_join_leaves_the_run_unchanged_and_is_tracked(finished):
    tmp, before = finished
    assert _digest(tmp / "run") == before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("fedbip")
    fed = client.search_runs([exp.experiment_id], f"tags.output_dir = '{tmp / 'run'}'")
    joins = client.search_runs([exp.experiment_id], "tags.kind = 'join'")
    assert len(fed) == 1 and len(joins) == 1
    join_run = joins[0]
    assert join_run.data.tags["federation_run_id"] == fed[0].info.run_id
    assert join_run.info.status == "FINISHED"
    g0 = _summary(tmp)["g0"]
    arts = {a.path for a in client.list_artifacts(join_run.info.run_id,
                                                  f"newcomers/{g0['directory']}")}
    assert f"newcomers/{g0['directory']}/join.json" in arts
    assert f"newcomers/{g0['directory']}/adapter" in arts
    assert g0["mlflow_run_id"] == join_run.info.run_id


@pytest.mark.ray
def test_python_join_and_models_match_the_cli(finished, tmp_path):
    tmp, _ = finished
    frame = pd.read_csv(tmp / "new.csv")
    frame[frame["user"] == "g0"].to_parquet(tmp_path / "g0.parquet")
    res = fedbip_ray.join(tmp / "run", tmp_path / "g0.parquet", client_column="user",
                          output=tmp_path / "out", overrides=["tracking.mlflow=false"])
    cli = _summary(tmp)["g0"]
    assert len(res) == 1 and res[0].weights == tuple(cli["weights"])
    assert res[0].test == cli["test"] and res[0].mix == cli["mix"]
    from fedbip_ray.data.shards import read_shard
    from fedbip_ray.models.factory import load_tokenizer
    from fedbip_ray.tracking.adapters import evaluate_classifier

    snap_cfg = config_from_dict(tiny_config())
    model = fedbip_ray.load_client_model(tmp / "run", "g0", joined_dir=tmp_path / "out")
    test = read_shard(next((tmp_path / "out" / "shards").glob("*.parquet")))["test"]
    got = evaluate_classifier(model, load_tokenizer(snap_cfg.model), test, 24)
    assert got["accuracy"] == pytest.approx(res[0].test["accuracy"])
    from peft import PeftModel

    stored = fedbip_ray.load_client_model(tmp / "run", 0)
    assert isinstance(stored, PeftModel) and isinstance(model, PeftModel)


class _StatesAtStart:
    """Records every client's state on the server when the (resumed) run starts."""

    def __init__(self) -> None:
        self.states: np.ndarray | None = None

    def on_start(self, run) -> None:
        import ray

        self.states = np.stack(ray.get([run.server.get_state.remote(c)
                                        for c in range(run.shards.num_clients)]))

    def on_round(self, run, row, report) -> None:
        pass

    def on_end(self, run, summary) -> None:
        pass


@pytest.mark.ray
def test_joined_clients_take_part_in_a_resumed_run(finished, tmp_path):
    from safetensors.numpy import load_file

    from fedbip_ray.runtime import checkpoint as ckpt_io
    from fedbip_ray.runtime.federation import run_federation

    tmp, _ = finished
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    rows_before = (run / "metrics.jsonl").read_text().splitlines()
    stored = ckpt_io.read_latest(run / "checkpoints").tensors["states"]
    newcomers = json.loads((tmp / "joined" / "summary.json").read_text())["newcomers"]
    joined = {e["client_id"]: load_file(str(tmp / "joined" / e["directory"] / "state.safetensors"))
              for e in newcomers}
    cfg = load_config(run / "config.yaml", [f"data.joined=[{tmp / 'joined'}]",
                                            "federation.rounds=2", "tracking.mlflow=false"])
    probe = _StatesAtStart()
    summary = run_federation(cfg, run, resume=True, callbacks=[probe], echo=lambda s: None)
    n = len(stored)
    assert probe.states is not None and probe.states.shape[0] == n + len(newcomers)
    assert np.array_equal(probe.states[:n], stored)  # the stored clients: as the run left them
    for cid, tensors in joined.items():  # each newcomer: the adapter the join gave it
        assert np.array_equal(probe.states[cid], tensors["state"])
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[: len(rows_before)] == rows_before and len(rows) == len(rows_before) + 1
    every = {str(c) for c in range(n + len(newcomers))}
    assert set(json.loads(rows[-1])["per_client_accuracy"]) == every
    assert set(summary["per_client_accuracy"]) == every
    meta = json.loads((run / "shards" / "clients.json").read_text())["clients"]
    for e in newcomers:
        shard = (run / "shards" / f"client_{e['client_id']:05d}.parquet").read_bytes()
        assert shard == (tmp / "joined" / "shards" / f"{e['directory']}.parquet").read_bytes()
        assert meta[e["client_id"]]["joined"] == e["name"]
    after = ckpt_io.read_latest(run / "checkpoints")
    assert after.round == 2 and after.num_clients == n + len(newcomers)
    assert load_config(run / "config.yaml").data.joined == (str(tmp / "joined"),)


@pytest.mark.ray
def test_generative_run_joins_newcomers_from_prompt_response_rows(ray_local, tmp_path):
    """A causal-LM run on a file of prompt/response/task rows; newcomers in the same columns
    (one of a task the run never saw) join it through the CLI."""
    from fedbip_ray.config import DataConfig
    from fedbip_ray.data.datasets import load_dataset
    from fedbip_ray.runtime.federation import run_federation

    frame = load_dataset(DataConfig(dataset="instruct-tasks"), 0).frame
    cols = ["prompt", "response", "task"]
    parts = {t: frame[frame["task"] == t][cols].head(36) for t in ("sentiment", "arithmetic",
                                                                     "reverse-words")}
    fed = pd.concat([parts["sentiment"].head(24), parts["arithmetic"].head(24)])
    fed.rename(columns={"prompt": "q"}).assign(user=fed["task"]).to_parquet(tmp_path / "f.parquet")
    new = pd.concat([parts["sentiment"].tail(12), parts["reverse-words"].tail(12)])
    new.assign(who=new["task"]).rename(columns={"prompt": "q"}).to_csv(tmp_path / "new.csv")
    cfg = config_from_dict(tiny_config(
        model={"name": "tiny-llama", "task": "causal-lm", "max_length": 64,
               "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "intermediate_size": 32}},
        data={"dataset": "file", "path": str(tmp_path / "f.parquet"), "prompt_column": "q",
              "task_column": "task", "client_column": "user", "num_clients": 2,
              "examples_per_client": 24, "partition": {"kind": "column"}},
        train={"local_epochs": 1, "batch_size": 8, "lr": 0.01, "eval_batch_size": 8},
        federation={"rounds": 1}))
    run_federation(cfg, tmp_path / "run", echo=lambda s: None)
    rc = main(["join", str(tmp_path / "run"), "--data", str(tmp_path / "new.csv"),
               "--client-column", "who", "--output", str(tmp_path / "joined")])
    assert rc == 0
    got = {e["name"]: e for e in json.loads((tmp_path / "joined" / "summary.json")
                                            .read_text())["newcomers"]}
    assert set(got) == {"sentiment", "reverse-words"}
    for task, entry in got.items():
        assert 0.0 <= entry["test"]["accuracy"] <= 1.0
        assert set(entry["test"]["per_task"]) == {task}
        assert len(entry["weights"]) == 3 and entry["peers"][-1] == "self"


BAD = [
    ("no-run", ["join", "{tmp}/missing", "--data", "{tmp}/new.csv"], "not found"),
    ("columns", ["join", "{tmp}/run", "--data", "{tmp}/cols.csv"], "columns ['text'] missing"),
    ("empty", ["join", "{tmp}/run", "--data", "{tmp}/empty.csv"], "no rows"),
    ("model", ["join", "{tmp}/run", "--data", "{tmp}/new.csv", "--set", "model.peft.r=8",
               "--set", "tracking.mlflow=false", "--output", "{tmp}/bad"], "does not match"),
]


@pytest.mark.ray
@pytest.mark.parametrize(("case", "argv", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(finished, capsys, case, argv, message):
    tmp, _ = finished
    pd.DataFrame({"review": ["good"], "label": [1]}).to_csv(tmp / "cols.csv", index=False)
    (tmp / "empty.csv").write_text("text,label\n")
    capsys.readouterr()
    rc = main([a.format(tmp=tmp) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def _update(cid: int, rnd: int, vec: np.ndarray, layout: Layout) -> ClientUpdate:
    return ClientUpdate(cid, rnd, vec.astype(np.float32), layout, 10)


def test_late_joiner_aggregates_over_every_stored_client():
    layout = Layout.from_shapes({"head.weight": (4,)})
    e = np.eye(4, dtype=np.float32)
    init = np.full(4, 0.5, dtype=np.float32)
    strategy = {"threshold": 0.5, "relative_threshold": False, "gate": []}
    server = FederatedServer(ServerSettings.of("fedbip", strategy, 4))
    server.initialize(init, layout)
    server.aggregate(1, [_update(0, 1, 2 * e[0], layout), _update(1, 1, 3 * e[1], layout)])
    before = server.all_states().copy()
    # round 2: client 2 (never took part) with client 1; client 0 is absent
    server.aggregate(2, [_update(1, 2, e[1], layout), _update(2, 2, 4 * e[0], layout)])
    after = server.all_states().copy()
    expected = join_aggregate(make_strategy("fedbip", strategy),
                              np.stack([before[0], before[1] + e[1], before[3]]), init,
                              (4 * e[0])[None], layout, np.ones(3), np.ones(1), together=True)
    assert np.allclose(after[2], expected[0].state)
    assert np.allclose(after[2], init + (2 * e[0] + 4 * e[0]) / 2)  # from absent client 0
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[3], init)
    # a round of clients that all took part before is the strategy's plain aggregation
    server.aggregate(3, [_update(1, 3, e[1], layout), _update(2, 3, e[0], layout)])
    assert np.allclose(server.all_states()[2], after[2] + e[0])


def test_api_is_lazy_and_takes_overrides():
    import subprocess
    import sys

    code = ("import sys, fedbip_ray; fedbip_ray.run, fedbip_ray.join, fedbip_ray.load_client_model;"
            "assert not {'torch', 'ray', 'mlflow'} & set(sys.modules), sys.modules.keys()")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    from fedbip_ray.api import _config

    cfg = _config(tiny_config(), {"federation__rounds": 5, "strategy.params.gate": [1.0, 0.0]})
    assert cfg.federation.rounds == 5 and cfg.strategy.params == {"gate": [1.0, 0.0]}
    with pytest.raises(AttributeError):
        fedbip_ray.no_such_thing  # noqa: B018
