"""Layout, module keys and TaskVector arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbip_ray.core.taskvector import (
    Layout,
    LayoutMismatchError,
    TaskVector,
    module_groups,
    module_key,
)

SHAPES = {
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": (2, 4),
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight": (3, 2),
    "base_model.model.classifier.modules_to_save.default.weight": (2, 3),
    "base_model.model.classifier.modules_to_save.default.bias": (2,),
}


class FakeTensor:
    """Duck-typed stand-in for a torch tensor (``.detach().cpu().float().numpy()``)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.asarray(data)

    def detach(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return self

    def float(self) -> FakeTensor:
        return FakeTensor(self.data.astype(np.float32))

    def numpy(self) -> np.ndarray:
        return self.data


@pytest.fixture()
def layout() -> Layout:
    return Layout.from_shapes(SHAPES)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def test_layout_from_shapes_keeps_order_and_offsets(layout: Layout) -> None:
    assert layout.names == tuple(SHAPES)
    assert layout.offsets == (0, 8, 14, 20)
    assert layout.size == 22
    name = list(SHAPES)[2]
    assert layout.index(name) == slice(14, 20)
    assert layout.shape(name) == (2, 3)
    assert len(layout) == 4 and name in layout


def test_layout_json_roundtrip_and_equality(layout: Layout) -> None:
    again = Layout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert Layout.from_shapes({"a": (2,)}) != Layout.from_shapes({"a": (3,)})
    assert Layout.from_shapes({}).size == 0


def test_layout_rejects_bad_offsets_and_duplicates() -> None:
    with pytest.raises(ValueError, match="offset"):
        Layout(("a", "b"), ((2,), (3,)), (0, 1))
    with pytest.raises(ValueError, match="duplicate"):
        Layout(("a", "a"), ((2,), (3,)), (0, 2))
    with pytest.raises(ValueError, match="one shape"):
        Layout(("a",), ((2,), (3,)), (0,))


def test_first_difference_names_parameter() -> None:
    a = Layout.from_shapes({"x": (2,), "y": (3,)})
    assert a.first_difference(a) is None
    assert "'y'" in a.first_difference(Layout.from_shapes({"x": (2,), "y": (4,)}))
    assert "missing parameter 'y'" in a.first_difference(Layout.from_shapes({"x": (2,)}))
    extra = Layout.from_shapes({"x": (2,), "y": (3,), "z": (1,)})
    assert "unexpected parameter 'z'" in a.first_difference(extra)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
            "base_model.model.bert.encoder.layer.0.attention.self.query",
        ),
        (
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight",
            "base_model.model.bert.encoder.layer.0.attention.self.query",
        ),
        (
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.local.weight",
            "base_model.model.bert.encoder.layer.0.attention.self.query",
        ),
        ("classifier.modules_to_save.default.weight", "classifier"),
        ("classifier.modules_to_save.local.bias", "classifier"),
        ("classifier.modules_to_save.default.bias", "classifier"),
        ("model.embed.lora_embedding_A.default", "model.embed"),
        ("model.layer.0.fc.ia3_l.default", "model.layer.0.fc"),
        ("pooler.dense.weight", "pooler.dense"),
        ("weight", "weight"),
    ],
)
def test_module_key(name: str, key: str) -> None:
    assert module_key(name) == key


def test_module_groups(layout: Layout) -> None:
    groups = module_groups(layout)
    assert list(groups) == [
        "base_model.model.bert.encoder.layer.0.attention.self.query",
        "base_model.model.classifier",
    ]
    np.testing.assert_array_equal(groups["base_model.model.classifier"], np.arange(14, 22))
    assert all(g.dtype == np.int64 for g in groups.values())


def test_from_tensors_roundtrip_any_order(layout: Layout) -> None:
    tensors = _tensors()
    reversed_order = dict(reversed(list(tensors.items())))
    tv = TaskVector.from_tensors(reversed_order, layout)
    assert tv.buffer.dtype == np.float32 and tv.buffer.shape == (22,)
    back = tv.to_arrays()
    assert list(back) == list(SHAPES)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(back[name], arr)
    assert TaskVector.from_tensors(tensors).layout == layout


def test_from_tensors_accepts_torch_like_tensors(layout: Layout) -> None:
    tensors = {n: FakeTensor(a.astype(np.float64)) for n, a in _tensors().items()}
    tv = TaskVector.from_tensors(tensors, layout)
    np.testing.assert_allclose(tv.buffer, TaskVector.from_tensors(_tensors(), layout).buffer)


def test_from_tensors_layout_mismatch_names_parameter(layout: Layout) -> None:
    tensors = _tensors()
    first, last = list(SHAPES)[0], list(SHAPES)[-1]
    missing = {k: v for k, v in tensors.items() if k != last}
    with pytest.raises(LayoutMismatchError, match="missing parameter.*bias"):
        TaskVector.from_tensors(missing, layout)
    wrong = dict(tensors, **{first: np.zeros((4, 2), np.float32)})
    with pytest.raises(LayoutMismatchError, match="lora_A"):
        TaskVector.from_tensors(wrong, layout)
    with pytest.raises(LayoutMismatchError, match="unexpected parameter 'extra'"):
        TaskVector.from_tensors(dict(tensors, extra=np.zeros(1)), layout)


def test_arithmetic_returns_new_objects(layout: Layout) -> None:
    a = TaskVector.from_tensors(_tensors(0), layout)
    b = TaskVector.from_tensors(_tensors(1), layout)
    a_before = a.buffer.copy()
    np.testing.assert_allclose((a + b).buffer, a.buffer + b.buffer)
    np.testing.assert_allclose((a - b).buffer, a.buffer - b.buffer)
    np.testing.assert_allclose((2 * a).buffer, 2 * a.buffer)
    np.testing.assert_allclose((a * 0.5).buffer, 0.5 * a.buffer)
    np.testing.assert_allclose((-a).buffer, -a.buffer)
    np.testing.assert_array_equal(a.buffer, a_before)
    assert (a * 2).buffer.dtype == np.float32
    assert (a + b) is not a
    assert a.norm() == pytest.approx(float(np.linalg.norm(a.buffer.astype(np.float64))), rel=1e-6)
    assert TaskVector.zeros(layout).norm() == 0.0


def test_arithmetic_layout_mismatch_raises(layout: Layout) -> None:
    a = TaskVector.from_tensors(_tensors(), layout)
    other = TaskVector.zeros(Layout.from_shapes({"x": (22,)}))
    with pytest.raises(LayoutMismatchError):
        _ = a + other
    with pytest.raises(LayoutMismatchError):
        _ = a - other
    with pytest.raises(TypeError):
        _ = a + 1.0  # type: ignore[operator]


def test_buffer_is_validated(layout: Layout) -> None:
    with pytest.raises(TypeError, match="float32"):
        TaskVector(np.zeros(layout.size), layout)
    with pytest.raises(ValueError, match="shape"):
        TaskVector(np.zeros(layout.size + 1, np.float32), layout)
    with pytest.raises(ValueError, match="shape"):
        TaskVector(np.zeros((1, layout.size), np.float32), layout)


def test_layout_and_task_vector_pickle(layout: Layout) -> None:
    import pickle

    tv = TaskVector.from_tensors(_tensors(), layout)
    again = pickle.loads(pickle.dumps(tv))
    assert again.layout == layout
    assert again.layout.index(list(SHAPES)[1]) == layout.index(list(SHAPES)[1])
    np.testing.assert_array_equal(again.buffer, tv.buffer)
