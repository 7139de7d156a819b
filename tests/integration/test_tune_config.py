"""The ``tune:`` section: parsing, one-line errors, sampling, trial bundles, best-trial choice
(pure: no Ray runtime needed)."""

from __future__ import annotations

import math

import pytest
import yaml

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.tuning.search import absolutize_paths
from fedbip_ray.tuning.space import (
    check_space,
    load_tune_config,
    parse_settings,
    sample_space,
    split_tune_config,
    trial_config,
)
from fedbip_ray.tuning.trials import pick_best, round_metrics, trial_bundles

from ..conftest import REPO, tiny_config

SPACE = {"strategy.params.threshold": {"uniform": [-0.2, 0.6]},
         "strategy.params.temperature": {"choice": [None, 0.1, 0.5]},
         "train.lr": {"loguniform": [1e-4, 1e-2]},
         "model.peft.r": {"choice": [4, 8]}}


def _tune(**kw):
    return {**tiny_config(), "tune": {"num_samples": 3, "space": SPACE, **kw}}


def test_tune_section_is_split_off_and_validated():
    data, cfg, settings = split_tune_config(_tune(max_concurrent=2), ["tune.num_samples=5"])
    assert "tune" not in data and cfg.name == "tiny"
    assert settings.num_samples == 5 and settings.max_concurrent == 2
    assert settings.metric == "mean_val_accuracy" and settings.scheduler == "asha"
    assert settings.space["train.lr"].kind == "loguniform"
    assert settings.space["strategy.params.temperature"].values == (None, 0.1, 0.5)


@pytest.mark.parametrize("tune, message", [
    ({"space": SPACE, "num_samples": 0},
     "config field 'tune.num_samples': Input should be greater than or equal to 1"),
    ({"space": SPACE, "metric": "mean_accuracy"}, "config field 'tune.metric'"),
    ({"space": SPACE, "bogus": 1}, "config field 'tune.bogus': unknown key"),
    ({"space": {}}, "config field 'tune.space': give at least one parameter"),
    ({"space": {"train.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
    ({"space": {"train.lr": {"uniform": [0.1]}}},
     "tune.space.train.lr': uniform needs [low, high]"),
    ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"space": {"train.lr": {"uniform": [0.5, 0.1]}}}, "uniform needs low < high"),
    ({"space": {"train.lr": {"uniform": [0.1, 0.5], "choice": [1]}}}, "give exactly one of"),
    ({"space": {"resources.num_cpus_per_client": {"choice": [1, 2]}}}, "cannot be searched"),
    ({"space": {"federation.rounds": {"choice": [1, 2]}}}, "cannot be searched"),
])
def test_bad_tune_sections_give_one_line_errors(tune, message):
    with pytest.raises(ConfigError) as err:
        split_tune_config({**tiny_config(), "tune": tune})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_space_may_be_nested_and_overridden_with_set():
    _, _, settings = split_tune_config(
        {**tiny_config(),
         "tune": {"space": {"strategy": {"params": {"top_k": {"choice": [1, 2]}}}}}},
        ["tune.space.train.lr.uniform=[0.001, 0.01]"])
    assert set(settings.space) == {"strategy.params.top_k", "train.lr"}
    assert settings.space["train.lr"].values == (0.001, 0.01)


def test_missing_tune_section_and_bad_run_fields_are_config_errors():
    with pytest.raises(ConfigError, match="config field 'tune': missing"):
        split_tune_config(tiny_config())
    with pytest.raises(ConfigError, match="config field 'federation.rounds'"):
        split_tune_config(_tune(), ["federation.rounds=0"])


def test_space_bounds_are_checked_against_the_run_schema():
    data, _, settings = split_tune_config(
        {**tiny_config(),
         "tune": {"space": {"strategy.params.threshold": {"uniform": [-0.5, 1.5]}}}})
    with pytest.raises(ConfigError,
                       match=r"tune.space.'strategy.params.threshold' = 1.5: .*threshold"):
        check_space(data, settings)
    data, _, settings = split_tune_config(
        {**tiny_config(), "tune": {"space": {"train.nope": {"choice": [1]}}}})
    with pytest.raises(ConfigError, match="train.nope.*unknown key"):
        check_space(data, settings)


def test_sampling_follows_the_space_and_is_seeded():
    _, _, settings = split_tune_config(_tune())
    a = sample_space(settings.space, 50, seed=1)
    assert (a == sample_space(settings.space, 50, seed=1)
            and a != sample_space(settings.space, 50, seed=2))
    for p in a:
        assert -0.2 <= p["strategy.params.threshold"] <= 0.6
        assert 1e-4 <= p["train.lr"] <= 1e-2
        assert p["model.peft.r"] in (4, 8)
        assert p["strategy.params.temperature"] in (None, 0.1, 0.5)
    lrs = sorted(math.log10(p["train.lr"]) for p in a)
    assert lrs[0] < -3.3 and lrs[-1] > -2.7  # log-uniform covers both decades
    grid = parse_settings({"num_samples": 2, "space": {"strategy.params.top_k": {"grid": [1, 2, 3]},
                                                       "train.lr": {"uniform": [0.01, 0.02]}}})
    g = sample_space(grid.space, 2, seed=0)
    assert [p["strategy.params.top_k"] for p in g] == [1, 2, 3, 1, 2, 3]


def test_trial_config_applies_dotted_params():
    data, _, _ = split_tune_config(_tune())
    cfg = trial_config(data, {"strategy.params.threshold": 0.25, "model.peft.r": 8,
                              "train.lr": 0.003})
    assert (cfg.strategy.params["threshold"] == 0.25 and cfg.model.peft.r == 8
            and cfg.train.lr == 0.003)
    assert config_from_dict(data).model.peft.r == 4  # the base is untouched


def test_paths_and_tracking_uri_become_absolute(tmp_path):
    (tmp_path / "my.parquet").write_text("x")
    data = {**tiny_config(), "data": {**tiny_config()["data"], "path": "my.parquet"}}
    out = absolutize_paths(data, tmp_path, "sqlite:////abs/mlflow.db")
    assert out["data"]["path"] == str(tmp_path / "my.parquet")
    assert out["tracking"]["tracking_uri"] == "sqlite:////abs/mlflow.db"
    assert out["model"]["name"] == "tiny-bert"  # an alias, not a path


def test_trial_bundles_fit_inside_the_cluster():
    cfg = config_from_dict(tiny_config())
    _, _, one = split_tune_config(_tune(max_concurrent=1))
    _, _, two = split_tune_config(_tune(max_concurrent=2))
    assert trial_bundles(cfg, one, {"CPU": 2.0}) == (2, [{}, {"CPU": 1.0}, {"CPU": 1.0}])
    assert trial_bundles(cfg, two, {"CPU": 2.0}) == (1, [{}, {"CPU": 1.0}])
    _, _, big = split_tune_config(_tune(actors_per_trial=3))
    with pytest.raises(ConfigError, match="one trial needs 3 CPU"):
        trial_bundles(cfg, big, {"CPU": 2.0})
    gpu = config_from_dict(tiny_config(resources={"num_gpus_per_client": 1}))
    with pytest.raises(ConfigError, match="0 GPUs"):
        trial_bundles(gpu, one, {"CPU": 2.0})


def test_round_metrics_report_validation_and_skip_unevaluated_rounds():
    row = {"round": 2, "mean_val_accuracy": 0.5, "per_client_val_accuracy": {"0": 0.2, "1": 0.8},
           "mean_accuracy": 0.6, "worst10_accuracy": 0.3, "train_loss": None, "bytes_in": 10,
           "bytes_out": 20, "seconds": 1.5}
    m = round_metrics(row)
    assert m["round"] == 2 and m["worst10_val_accuracy"] == 0.2 and math.isnan(m["train_loss"])
    assert round_metrics({**row, "mean_val_accuracy": None}) is None


def test_pick_best_prefers_complete_trials_and_keeps_first_of_ties():
    trials = [
        {"trial_id": "a", "last": {"round": 1, "mean_val_accuracy": 0.99}},  # stopped early
        {"trial_id": "b", "last": {"round": 3, "mean_val_accuracy": 0.80}},
        {"trial_id": "c", "last": {"round": 3, "mean_val_accuracy": 0.80}},
        {"trial_id": "d", "last": {}},
    ]
    assert pick_best(trials, "mean_val_accuracy", "max", 3)["trial_id"] == "b"
    assert pick_best(trials, "mean_val_accuracy", "min", 3)["trial_id"] == "b"
    assert pick_best(trials[:1], "mean_val_accuracy", "max", 3)["trial_id"] == "a"
    with pytest.raises(ValueError):
        pick_best(trials[3:], "mean_val_accuracy", "max", 3)


@pytest.mark.parametrize("name", ["tune.yaml", "tune_tiny.yaml"])
def test_shipped_tune_configs_are_valid(name):
    path = REPO / "jobs" / "configs" / name
    data, cfg, settings = load_tune_config(path)
    check_space(data, settings)
    assert settings.space and cfg.tracking.mlflow
    assert "tune" in yaml.safe_load(path.read_text())


def test_job_entrypoint_maps_to_fedbip_tune():
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_tune", REPO / "jobs" / "tune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = mod.parse(["--config", "c.yaml", "--set", "tune.num_samples=2", "--output", "o"])
    assert argv == ["tune", "c.yaml", "--set", "tune.num_samples=2", "--output", "o"]
    from fedbip_ray.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.command, args.config, args.overrides, args.output) == (
        "tune", "c.yaml", ["tune.num_samples=2"], "o")
