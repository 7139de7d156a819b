"""Test-only fault injection for client updates (numpy only).

``FEDBIP_TEST_POISON="CLIENT:MODE[,CLIENT:MODE...]"`` in a client actor's environment corrupts
that client's ``fit`` result (see :data:`POISON_MODES`). The driver forwards ``FEDBIP_TEST_*``
variables to its actors; the actor imports this module only when the variable is set.
"""

from __future__ import annotations

import os

import numpy as np

POISON_ENV = "FEDBIP_TEST_POISON"
POISON_MODES = {
    "scale": "task vector multiplied by 1e6",
    "nan": "first entry of the task vector set to NaN",
    "layout": "task vector one entry short (wrong shape)",
    "raise": "fit raises RuntimeError (the actor survives)",
}


def parse_poison(text: str | None) -> dict[int, str]:
    """``"1:scale,3:nan"`` -> ``{1: "scale", 3: "nan"}``; malformed entries raise ValueError."""
    out: dict[int, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        cid, _, mode = item.strip().partition(":")
        if mode not in POISON_MODES or not cid.isdigit():
            raise ValueError(f"{POISON_ENV}: bad entry {item!r} "
                             f"(want CLIENT:{'|'.join(POISON_MODES)})")
        out[int(cid)] = mode
    return out


def poison_vector(vector: np.ndarray, mode: str) -> np.ndarray:
    """Corrupt a (D,) float32 task vector as ``mode`` says (returns a new array)."""
    if mode == "scale":
        return (vector * np.float32(1e6)).astype(np.float32)
    if mode == "nan":
        out = vector.copy()
        out[0] = np.nan
        return out
    if mode == "layout":
        return vector[:-1].copy()
    if mode == "raise":
        raise RuntimeError("injected client failure (FEDBIP_TEST_POISON)")
    raise ValueError(f"unknown poison mode {mode!r}")


def poison_update(vector: np.ndarray, client_id: int) -> np.ndarray:
    """``vector`` (D,) corrupted as :data:`POISON_ENV` says for ``client_id`` (else unchanged)."""
    mode = parse_poison(os.environ.get(POISON_ENV)).get(client_id)
    return vector if mode is None else poison_vector(vector, mode)
