"""The shard directory layout has one reader: ShardSet.load gives back what build_shards wrote."""

from __future__ import annotations

import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data.shards import ShardSet, build_shards, read_shard, shard_path


def test_load_gives_back_the_written_shard_set(tmp_path):
    cfg = config_from_dict({"data": {"dataset": "synthetic-text", "num_clients": 3,
                                     "examples_per_client": 20}})
    built = build_shards(cfg.data, 0, tmp_path)
    loaded = ShardSet.load(tmp_path)
    assert loaded == built
    assert loaded.paths[2] == shard_path(tmp_path, 2) == tmp_path / "client_00002.parquet"
    assert sum(len(f) for f in read_shard(loaded.paths[0]).values()) == 20


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="clients.json not found"):
        ShardSet.load(tmp_path)
    (tmp_path / "clients.json").write_text("{truncated")
    with pytest.raises(ConfigError, match="clients.json unreadable") as err:
        ShardSet.load(tmp_path)
    assert "\n" not in str(err.value)
