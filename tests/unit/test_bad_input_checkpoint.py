"""Checkpoints on disk (no Ray): atomic layout, leftovers of a killed writer, and every kind of
corrupt checkpoint giving one ConfigError line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedbip_ray.config import ConfigError
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime import checkpoint as C

LAYOUT = Layout.from_shapes({"a": (3,), "b": (2, 2)}).to_dict()
N, D = 3, 7


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"states": rng.standard_normal((N, D)).astype(np.float32),
            "init": np.zeros(D, dtype=np.float32),
            "similarity": np.eye(N)}


def _history(r: int) -> list[dict]:
    return [{"round": i, "mean_accuracy": 0.5} for i in range(1, r + 1)]


def _write(root: Path, r: int, seed: int = 0) -> Path:
    return C.write_checkpoint(root, r, _tensors(seed), LAYOUT, _history(r), {"seed": 0})


def test_roundtrip_keeps_the_last_two_and_no_temporaries(tmp_path):
    root = tmp_path / "checkpoints"
    for r in range(1, 5):
        _write(root, r, seed=r)
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "round_00003", "round_00004"]
    ck = C.read_latest(root)
    assert ck is not None and ck.round == 4 and ck.num_clients == N
    assert np.array_equal(ck.tensors["states"], _tensors(4)["states"])
    assert ck.history == _history(4) and ck.layout == LAYOUT and ck.config == {"seed": 0}
    meta = json.loads((root / "round_00004" / "meta.json").read_text())
    assert meta["format"] == C.FORMAT and len(meta["sha256"][C.TENSORS]) == 64


def test_run_metadata_travels_with_the_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    C.write_checkpoint(root, 1, _tensors(), LAYOUT, _history(1), {"seed": 0},
                       {"mlflow_run_id": "abc123"})
    assert C.read_latest(root).extra == {"mlflow_run_id": "abc123"}
    _write(root, 2)  # none given: empty, not the previous one's
    assert C.read_latest(root).extra == {}


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    _write(root, 1)
    # killed while writing round 2 (temporary dir) / after the rename, before latest.json moved
    (root / ".tmp_round_00002").mkdir()
    (root / ".tmp_round_00002" / "server.safetensors").write_bytes(b"partial")
    (root / "round_00002").mkdir()
    (root / ".latest.json.tmp").write_text("{")
    assert C.read_latest(root).round == 1  # type: ignore[union-attr]
    _write(root, 2, seed=2)  # the resumed run redoes round 2
    assert C.read_latest(root).round == 2  # type: ignore[union-attr]
    assert not (root / ".tmp_round_00002").exists()
    assert np.array_equal(C.read_latest(root).tensors["states"], _tensors(2)["states"])  # type: ignore[union-attr]


def test_no_checkpoint_is_none_and_clear_forgets_all(tmp_path):
    assert C.read_latest(tmp_path / "nothing") is None
    root = tmp_path / "checkpoints"
    _write(root, 1)
    C.clear(root)
    assert C.read_latest(root) is None and not list(root.glob("round_*"))


def _corrupt_latest_garbage(root: Path) -> None:
    (root / "latest.json").write_text("{not json")


def _corrupt_latest_traversal(root: Path) -> None:
    (root / "latest.json").write_text(json.dumps({"round": 1, "path": "../../etc"}))


def _corrupt_latest_points_nowhere(root: Path) -> None:
    (root / "latest.json").write_text(json.dumps({"round": 9, "path": "round_00009"}))


def _corrupt_meta_missing(root: Path) -> None:
    (root / "round_00001" / "meta.json").unlink()


def _corrupt_meta_round(root: Path) -> None:
    meta = json.loads((root / "round_00001" / "meta.json").read_text())
    (root / "round_00001" / "meta.json").write_text(json.dumps({**meta, "round": 2}))


def _corrupt_history(root: Path) -> None:
    meta = json.loads((root / "round_00001" / "meta.json").read_text())
    (root / "round_00001" / "meta.json").write_text(json.dumps({**meta, "history": []}))


def _corrupt_flip_a_byte(root: Path) -> None:
    path = root / "round_00001" / C.TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_truncate(root: Path) -> None:
    path = root / "round_00001" / C.TENSORS
    path.write_bytes(path.read_bytes()[:20])


def _rewrite_tensors(root: Path, tensors: dict) -> None:
    """Replace the tensors but fix the checksum (a consistent yet invalid checkpoint)."""
    path = root / "round_00001" / C.TENSORS
    save_file(tensors, str(path))
    meta = json.loads((root / "round_00001" / "meta.json").read_text())
    meta["sha256"] = {C.TENSORS: C.sha256_file(path)}
    (root / "round_00001" / "meta.json").write_text(json.dumps(meta))


def _corrupt_nan_states(root: Path) -> None:
    t = _tensors()
    t["states"][0, 0] = np.nan
    _rewrite_tensors(root, t)


def _corrupt_wrong_shape(root: Path) -> None:
    t = _tensors()
    t["states"] = t["states"][:, :5].copy()
    _rewrite_tensors(root, t)


def _corrupt_layout(root: Path) -> None:
    (root / "round_00001" / "layout.json").write_text(json.dumps({"names": ["a"]}))


def _corrupt_pickle_instead(root: Path) -> None:
    import pickle

    (root / "round_00001" / C.TENSORS).write_bytes(pickle.dumps(_tensors()))


@pytest.mark.parametrize("corrupt, needle", [
    (_corrupt_latest_garbage, "latest.json unreadable"),
    (_corrupt_latest_traversal, "latest.json is malformed"),
    (_corrupt_latest_points_nowhere, "directory missing"),
    (_corrupt_meta_missing, "meta.json missing"),
    (_corrupt_meta_round, "does not match"),
    (_corrupt_history, "history is not rounds 1..1"),
    (_corrupt_flip_a_byte, "corrupt (sha256 mismatch)"),
    (_corrupt_truncate, "corrupt (sha256 mismatch)"),
    (_corrupt_nan_states, "NaN/Inf"),
    (_corrupt_wrong_shape, "expected (N, 7) float32"),
    (_corrupt_layout, "layout.json invalid"),
    (_corrupt_pickle_instead, "corrupt"),
])
def test_corrupt_checkpoint_is_one_config_error_line(tmp_path, corrupt, needle):
    root = tmp_path / "checkpoints"
    _write(root, 1)
    corrupt(root)
    with pytest.raises(ConfigError) as err:
        C.read_latest(root)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_config_difference_names_the_first_frozen_field():
    base = {"seed": 0, "data": {"num_clients": 4, "partition": {"kind": "groups"}},
            "federation": {"rounds": 3, "updates": {"max_norm": None}},
            "strategy": {"name": "fedbip", "params": {}}, "tracking": {"mlflow": True}}
    same = json.loads(json.dumps(base))
    same["federation"]["rounds"] = 10
    same["tracking"]["mlflow"] = False
    assert C.config_difference(base, same) is None  # rounds and tracking may change
    other = json.loads(json.dumps(base))
    other["data"]["num_clients"] = 6
    assert C.config_difference(base, other) == "data.num_clients: 4 -> 6"
    params = json.loads(json.dumps(base))
    params["strategy"]["params"] = {"threshold": 0.1}
    assert C.config_difference(base, params) == "strategy.params: {} -> {'threshold': 0.1}"
    newer = json.loads(json.dumps(base))
    newer["privacy"] = {"clip_norm": None}
    assert C.config_difference(base, newer) is None  # a field added by a newer version


def test_streamed_safetensors_match_the_library_and_their_digest(tmp_path):
    tensors = {**_tensors(3), "empty": np.zeros((0, 4), dtype=np.float32),
               "counts": np.arange(5, dtype=np.int64)}
    path = tmp_path / "t.safetensors"
    with path.open("wb") as fh:
        digest = C.write_safetensors(fh, tensors)
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype and np.array_equal(back[name], arr), name
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="complex64"):
        C.write_safetensors((tmp_path / "x").open("wb"), {"z": np.zeros(2, dtype=np.complex64)})
