"""Config: YAML in, validated frozen objects out; one-line errors naming the field."""

from __future__ import annotations

import re

import pytest
import yaml
from pydantic import ValidationError

from fedbip_ray.config import ConfigError, config_from_dict, load_config

from ..conftest import REPO


def test_defaults_and_example_configs_validate():
    cfg = config_from_dict({})
    assert cfg.strategy.name == "fedbip"
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        data.pop("tune", None)  # search spaces are validated by the tuning module
        assert config_from_dict(data).name, path


def test_overrides_parse_yaml_values():
    cfg = config_from_dict({}, ["federation.rounds=7", "strategy.params.threshold=0.2",
                                "model.peft.target_modules=[query, key]", "tracking.mlflow=false"])
    assert cfg.federation.rounds == 7
    assert cfg.strategy.params == {"threshold": 0.2}
    assert cfg.model.peft.target_modules == ("query", "key")
    assert cfg.tracking.mlflow is False


@pytest.mark.parametrize(("every", "rounds", "due"), [
    (1, 4, [1, 2, 3, 4]), (2, 5, [2, 4, 5]), (3, 3, [3]), (0, 4, [4]), (10, 4, [4]),
])
def test_checkpoint_cadence_always_includes_the_last_round(every, rounds, due):
    fed = config_from_dict({"federation": {"rounds": rounds, "checkpoint_every": every}}).federation
    assert [r for r in range(1, rounds + 1) if fed.checkpoint_due(r)] == due


def test_config_is_frozen():
    cfg = config_from_dict({})
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({"federation": {"rounds": 0}}, [], "federation.rounds"),
        ({"bogus": 1}, [], "'bogus': unknown key"),
        ({"model": {"peft": {"r": "eight"}}}, [], "model.peft.r"),
        ({"strategy": {"name": "fedfoo"}}, [], "unknown strategy 'fedfoo'"),
        ({"strategy": {"name": "fedbip", "params": {"threshold": 2}}}, [],
         "threshold must be in [-1, 1]"),
        ({"strategy": {"name": "fedavg", "params": {"threshold": 0.1}}}, [],
         "unknown parameter 'threshold'"),
        ({"data": {"num_clients": 2}, "federation": {"clients_per_round": 3}}, [],
         "clients_per_round"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.5}}, [], "val_fraction + test_fraction"),
        ({}, ["federation.rounds"], "expected dotted.key=value"),
        ({}, ["seed=-1"], "config field 'seed'"),
        ({"resources": {"num_gpus_per_client": -1}}, [], "resources.num_gpus_per_client"),
        ({"federation": {"checkpoint_every": -1}}, [], "federation.checkpoint_every"),
    ],
)
def test_bad_config_gives_one_line_naming_the_field(data, overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, overrides)
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"model": {"name": "tiny-cnn"}},
         "model.name 'tiny-cnn' needs model.task 'image-classification'"),
        ({"data": {"dataset": "digits"}}, "data.dataset 'digits' needs model.task"),
        ({"data": {"partition": {"shift": "rotation"}}}, "shift 'rotation' needs model.task"),
    ],
)
def test_model_dataset_task_mismatch(data, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data)


@pytest.mark.parametrize("data,needle", [
    ({"data": {"dataset": "file", "path": "x.jsonl", "messages_column": "messages"}},
     "data.messages_column holds instruction data: it needs model.task 'causal-lm'"),
    ({"data": {"dataset": "file", "path": "x.csv", "prompt_column": "q"}},
     "data.prompt_column holds instruction data"),
    ({"strategy": {"name": "fedsa-lora"}, "model": {"peft": {"method": "ia3"}}},
     "strategy 'fedsa-lora' shares LoRA A factors: it needs model.peft.method 'lora'"),
])
def test_combinations_that_cannot_work_are_refused_at_parse_time(data, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_dict(data)
