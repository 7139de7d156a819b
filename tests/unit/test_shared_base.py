"""The shared frozen base without Ray: split and rebuild (ties kept, no copy), trainers over it
equal to trainers over a private copy, the cases that fall back, the config switch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data.shards import build_shards, read_shard
from fedbip_ray.models.shared_base import (
    FrozenBase,
    adopt_base,
    build_frozen_base,
    export_base,
    in_ranges,
    privatize_trainables,
    shared_ranges,
    unfit_reason,
)
from fedbip_ray.runtime.base_store import private_reason
from fedbip_ray.training.registry import make_trainer

from ..conftest import tiny_config

TINY_LLAMA = {"name": "tiny-llama", "task": "causal-lm", "max_length": 80,
              "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                       "intermediate_size": 32},
              "peft": {"r": 4, "alpha": 8, "dropout": 0.0}}
TINY_CNN = {"name": "tiny-cnn", "task": "image-classification",
            "tiny": {"hidden_size": 8, "num_layers": 2}}


def _through_store(base: FrozenBase) -> FrozenBase:
    """What a worker gets from the object store: a fresh copy, arrays read-only."""
    out = pickle.loads(pickle.dumps(base, protocol=5))
    for arr in out.arrays.values():
        arr.setflags(write=False)
    return out


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((4,), 2.0))


def test_split_and_rebuild_keeps_ties_and_copies_nothing():
    torch.manual_seed(0)
    model = Tied()
    weight = model.embed.weight.detach().clone()
    base = _through_store(export_base(model, "sequence-classification"))
    assert list(base.arrays) == ["embed.weight"] and base.nbytes == 10 * 4 * 4
    assert model.embed.weight.device.type == "meta"  # the skeleton carries no weights
    rebuilt = adopt_base(base)
    assert rebuilt.head.weight is rebuilt.embed.weight
    assert rebuilt.embed.weight.data_ptr() == base.arrays["embed.weight"].ctypes.data
    assert torch.equal(rebuilt.embed.weight, weight)
    assert torch.equal(rebuilt.scale, torch.full((4,), 2.0))  # buffers are the worker's own


def test_a_trainable_parameter_in_the_shared_arrays_gets_a_private_copy():
    base = _through_store(export_base(Tied(), "sequence-classification"))
    model = adopt_base(base)
    ranges = shared_ranges(base)
    assert in_ranges(model.embed.weight, ranges)
    assert privatize_trainables(model, base) == 1  # requires_grad is still on: not frozen
    assert not in_ranges(model.embed.weight, ranges)
    assert model.head.weight is model.embed.weight  # still tied, now to the copy
    model.embed.weight.data.add_(1.0)
    assert np.array_equal(base.arrays["embed.weight"] + 1, model.embed.weight.detach().numpy())


@pytest.mark.parametrize("model", [TINY_LLAMA, TINY_CNN], ids=["causal-lm", "image"])
def test_a_trainer_over_the_shared_base_trains_as_over_a_private_copy(model, tmp_path):
    data = ({"dataset": "instruct-tasks", "num_clients": 2, "examples_per_client": 12,
             "partition": {"kind": "column"}} if model is TINY_LLAMA else
            {"dataset": "digits", "num_clients": 2, "examples_per_client": 40,
             "partition": {"kind": "iid"}})
    cfg = config_from_dict(tiny_config(model=model, data=data,
                                       train={"local_epochs": 1, "batch_size": 8,
                                              "eval_batch_size": 8}))
    shards = build_shards(cfg.data, cfg.seed, tmp_path)
    base = _through_store(build_frozen_base(cfg, shards.num_labels))
    frames = read_shard(shards.paths[0].read_bytes())
    results = []
    for shared in (None, base):
        trainer = make_trainer(cfg, shards.num_labels, torch.device("cpu"), shared)
        assert (trainer.shared_base is not None) == (shared is not None)
        split = {s: trainer.encode(f) for s, f in frames.items()}
        trainer.load_state(trainer.initial_state())
        trainer.train(split["train"], 1, 5)
        results.append((trainer.current_state(), trainer.evaluate(split["test"])))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_a_base_that_does_not_fit_the_trainer_is_named():
    base = export_base(Tied(), "causal-lm")
    cpu = torch.device("cpu")
    assert unfit_reason(base, "causal-lm", cpu, torch.float32) is None
    assert "cuda" in unfit_reason(base, "causal-lm", torch.device("cuda"), torch.float32)
    assert "bfloat16" in unfit_reason(base, "causal-lm", cpu, torch.bfloat16)
    assert "causal-lm" in unfit_reason(base, "image-classification", cpu, torch.float32)


def test_the_config_switch_and_gpu_runs_give_private_copies():
    assert private_reason(config_from_dict(tiny_config())) is None
    off = config_from_dict(tiny_config(resources={"share_base_model": False}))
    assert "share_base_model" in private_reason(off)
    gpu = config_from_dict(tiny_config(resources={"num_gpus_per_client": 1}))
    assert "GPU" in private_reason(gpu)
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_config(resources={"share_base_model": "maybe"}))
    assert "resources.share_base_model" in str(err.value) and "\n" not in str(err.value)
