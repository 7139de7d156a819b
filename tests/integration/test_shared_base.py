"""One frozen base per node (real local Ray): client actors over the shared base hold its weights
once, in Ray's object store, and train exactly as an actor with a private copy does."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import ray
import torch

from fedbip_ray.config import config_from_dict
from fedbip_ray.data.shards import build_shards
from fedbip_ray.models.shared_base import in_ranges, shared_ranges
from fedbip_ray.runtime.base_store import put_base
from fedbip_ray.runtime.cluster import spawn_client
from fedbip_ray.runtime.messages import ShardRef
from fedbip_ray.training.registry import make_trainer

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

# frozen weights of ~44 MB (the tokenizer's 30k-row embedding table among them), so that a
# private copy stands out of an actor's memory; only LoRA and the classifier are trained
MODEL = {"tiny": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
         "peft": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["classifier"]}}


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    """(config, shards, base handle, [shared actor, shared actor, private actor], their infos,
    a checksum of the shared arrays before any training)."""
    cfg = config_from_dict(tiny_config(model=MODEL, resources={"num_cpus_per_client": 0.5},
                                       data={"examples_per_client": 30}))
    shards = build_shards(cfg.data, cfg.seed, tmp_path_factory.mktemp("shards"))
    handle = put_base(cfg, shards.num_labels)
    assert handle is not None
    actors = [spawn_client(cfg, shards.num_labels, base=handle),
              spawn_client(cfg, shards.num_labels, base=handle),
              spawn_client(cfg, shards.num_labels)]
    try:
        infos = ray.get([a.info.remote() for a in actors])
        yield cfg, shards, handle, actors, infos, _checksum(handle)
    finally:
        for actor in actors:
            ray.kill(actor)


def _checksum(handle) -> float:
    base = ray.get(handle.ref)
    return float(sum(np.float64(a.astype(np.float64).sum()) for a in base.arrays.values()))


def _plasma_files(pid: int) -> set[str]:
    """Device:inode of the object-store files a process maps."""
    with open(f"/proc/{pid}/maps") as fh:
        rows = [line.split() for line in fh if "plasma" in line]
    return {row[3] + ":" + row[4] for row in rows}


def test_two_actors_on_one_node_hold_the_base_once(setup):
    _, _, handle, _, infos, _ = setup
    nbytes = ray.get(handle.ref).nbytes
    assert nbytes > 40e6
    assert [i["error"] for i in infos] == [None] * 3
    assert [i["shared_base_bytes"] for i in infos] == [nbytes, nbytes, 0]
    uss = [psutil.Process(i["pid"]).memory_full_info().uss for i in infos]
    # the private actor holds the frozen weights in its own memory, the others do not
    assert uss[0] < uss[2] - 0.8 * nbytes and uss[1] < uss[2] - 0.8 * nbytes, uss
    files = [_plasma_files(i["pid"]) for i in infos[:2]]
    assert files[0] and files[0] == files[1]


def test_shared_and_private_actors_train_and_score_identically(setup):
    _, shards, handle, actors, _, before = setup
    shard = ShardRef(0, ray.put(shards.paths[0].read_bytes()))
    inits = ray.get([a.initial_state.remote() for a in actors])
    assert all(np.array_equal(inits[0], s) for s in inits)
    updates = ray.get([a.fit.remote(0, inits[0], 1, 0.0, shard) for a in actors])
    assert np.abs(updates[2].vector).max() > 0
    for update in updates[:2]:
        assert np.array_equal(update.vector, updates[2].vector)
    trained = inits[0] + updates[2].vector
    scores = ray.get([a.evaluate.remote(0, trained, 1, ("val", "test"), 0, shard)
                      for a in actors])
    assert scores[0].splits == scores[1].splits == scores[2].splits
    assert _checksum(handle) == before  # training never wrote into the shared weights


def test_models_over_one_base_use_its_memory_and_train_private_copies(setup):
    cfg, shards, handle, _, _, checksum = setup
    bases = [ray.get(handle.ref), ray.get(handle.ref)]
    trainers = [make_trainer(cfg, shards.num_labels, torch.device("cpu"), b) for b in bases]
    ranges = shared_ranges(bases[0])
    frozen = [{n: p for n, p in t.model.named_parameters() if not p.requires_grad}
              for t in trainers]
    assert frozen[0].keys() == frozen[1].keys() and len(frozen[0]) > 10
    for name, p in frozen[0].items():
        assert p.data_ptr() == frozen[1][name].data_ptr() and in_ranges(p, ranges), name
    params = [t.params for t in trainers]
    assert params[0].keys() == params[1].keys()
    for name, p in params[0].items():
        other = params[1][name]
        assert not in_ranges(p, ranges) and p.data_ptr() != other.data_ptr(), name
        with torch.no_grad():
            p.add_(1.0)  # writable, and private to its trainer
        assert not torch.equal(p, other), name
    assert _checksum(handle) == checksum
