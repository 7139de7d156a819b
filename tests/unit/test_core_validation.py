"""Server-side validation of client updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.taskvector import Layout
from fedbip_ray.core.validation import UpdateRejected, validate_update

LAYOUT = Layout.from_shapes({"a.lora_A.default.weight": (2, 3), "a.lora_B.default.weight": (4, 2)})


def _vec(value: float = 0.1) -> np.ndarray:
    return np.full(LAYOUT.size, value, dtype=np.float32)


def test_accepts_valid_update() -> None:
    v = _vec()
    out, norm = validate_update(v, LAYOUT, LAYOUT, max_norm=10.0)
    assert out is v
    assert norm == pytest.approx(0.1 * np.sqrt(LAYOUT.size), rel=1e-6)


def test_rejects_layout_mismatch_naming_parameter() -> None:
    other = Layout.from_shapes(
        {"a.lora_A.default.weight": (2, 3), "a.lora_B.default.weight": (3, 2)}
    )
    with pytest.raises(
        UpdateRejected, match="layout mismatch: parameter 'a.lora_B.default.weight'"
    ):
        validate_update(np.zeros(other.size, np.float32), other, LAYOUT)
    missing = Layout.from_shapes({"a.lora_A.default.weight": (2, 3)})
    with pytest.raises(UpdateRejected, match="missing parameter 'a.lora_B"):
        validate_update(np.zeros(missing.size, np.float32), missing, LAYOUT)


@pytest.mark.parametrize(
    ("vector", "reason"),
    [
        (np.zeros(14, np.float64), "dtype float64"),
        (np.zeros(13, np.float32), "shape"),
        (np.zeros((1, 14), np.float32), "shape"),
        ([0.0] * 14, "numpy array"),
    ],
)
def test_rejects_wrong_dtype_or_shape(vector, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(vector, LAYOUT, LAYOUT)


def test_rejects_non_finite_with_count() -> None:
    v = _vec()
    v[[1, 4]] = np.nan
    v[7] = np.inf
    with pytest.raises(UpdateRejected, match="3 non-finite") as info:
        validate_update(v, LAYOUT, LAYOUT)
    assert "\n" not in str(info.value)


def test_norm_bound_reject_and_clip() -> None:
    v = _vec(1.0)  # norm sqrt(14) ~ 3.74
    with pytest.raises(UpdateRejected, match="exceeds the bound 2"):
        validate_update(v, LAYOUT, LAYOUT, max_norm=2.0)
    out, norm = validate_update(v, LAYOUT, LAYOUT, max_norm=2.0, on_excess_norm="clip")
    assert norm == pytest.approx(np.sqrt(14))
    assert out.dtype == np.float32 and out is not v
    assert float(np.linalg.norm(out)) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_array_equal(v, 1.0)  # input untouched


def test_invalid_server_settings() -> None:
    with pytest.raises(ValueError, match="on_excess_norm"):
        validate_update(_vec(), LAYOUT, LAYOUT, on_excess_norm="warn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_norm"):
        validate_update(_vec(), LAYOUT, LAYOUT, max_norm=0.0)
