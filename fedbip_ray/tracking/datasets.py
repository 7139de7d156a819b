"""Per-client data shards as MLflow dataset inputs (the run page's "Datasets used")."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from fedbip_ray.data.shards import ShardSet

DIGEST_CHARS = 16  # MLflow stores at most 36


def file_digest(path: Path) -> str:
    """First ``DIGEST_CHARS`` hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:DIGEST_CHARS]


def client_context(client_id: int) -> str:
    return f"client_{int(client_id):04d}"


def shard_profile(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """A shard's size as an MLflow dataset profile: rows per split, bytes, group, labels."""
    splits = {s: int(summary.get(s, 0)) for s in ("train", "val", "test")}
    return {"num_rows": sum(splits.values()), **splits, "bytes": path.stat().st_size,
            "group": int(summary.get("group", 0)),
            "label_histogram": list(summary.get("label_histogram", []))}


def shard_inputs(shards: ShardSet) -> list[Any]:
    """One ``DatasetInput`` per client shard: name and context ``client_XXXX``, the shard file as
    source, its digest, schema (from the Parquet data) and :func:`shard_profile`."""
    import mlflow.data
    import pandas as pd
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    out = []
    for cid, path in enumerate(shards.paths):
        name = client_context(cid)
        frame = pd.read_parquet(path)
        with warnings.catch_warnings():  # a local path matches two registered local sources
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(frame, source=str(path.resolve()), name=name,
                                         digest=file_digest(path)).to_dict()
        profile = shard_profile(shards.summary[cid], path)
        entity = Dataset(name=ds["name"], digest=ds["digest"], source_type=ds["source_type"],
                         source=ds["source"], schema=ds.get("schema"), profile=json.dumps(profile))
        out.append(DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, name)]))
    return out
