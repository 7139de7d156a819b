"""Receipt checks of one round's client updates, before any of them reaches aggregation.

Each update is checked for its round, client id, example count, layout, finiteness and norm
(:func:`~fedbip_ray.core.validation.validate_update`), its gradient signal when the strategy
compares gradients, and for being the client's only update of the round. A failed check
rejects that update alone, with a one-line reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedbip_ray.core.taskvector import Layout
from fedbip_ray.core.validation import UpdateRejected, validate_update
from fedbip_ray.runtime.messages import ClientUpdate

log = logging.getLogger("fedbip.server")


@dataclass
class ValidatedUpdates:
    """The accepted updates of one round, in arrival order, and why the others were not."""

    ids: list[int] = field(default_factory=list)
    vecs: list[np.ndarray] = field(default_factory=list)  # (D,) float32 each
    signals: list[np.ndarray] = field(default_factory=list)
    accepted: list[ClientUpdate] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    modified: list[int] = field(default_factory=list)  # accepted after norm clipping
    nbytes: int = 0


def check_update(update: ClientUpdate, round_num: int, num_clients: int, layout: Layout,
                 max_norm: float | None = None,
                 on_excess_norm: Literal["reject", "clip"] = "reject") -> np.ndarray:
    """Validated (possibly clipped) task vector (D,) float32, or raises UpdateRejected."""
    if update.round != round_num:
        raise UpdateRejected(f"update is for round {update.round}, expected {round_num}")
    if not 0 <= update.client_id < num_clients:
        raise UpdateRejected(f"unknown client id {update.client_id}")
    if update.num_examples <= 0:
        raise UpdateRejected(f"num_examples must be positive, got {update.num_examples}")
    if not isinstance(update.layout, Layout):
        raise UpdateRejected(f"update layout is a {type(update.layout).__name__}, not a Layout")
    vec, _ = validate_update(np.asarray(update.vector), update.layout, layout,
                             max_norm=max_norm, on_excess_norm=on_excess_norm)
    return vec


def check_signal(update: ClientUpdate, layout: Layout) -> np.ndarray:
    """The update's gradient signal (D,) float32 when the strategy compares gradients,
    checked like a task vector (shape, finiteness; no norm bound); raises UpdateRejected."""
    if update.signal is None:
        raise UpdateRejected("the strategy compares gradients but the update has no "
                             "gradient signal")
    try:
        sig, _ = validate_update(np.asarray(update.signal), layout, layout)
    except UpdateRejected as exc:
        raise UpdateRejected(f"gradient signal: {exc}") from None
    return sig


def validate_updates(updates: list[ClientUpdate], round_num: int, num_clients: int,
                     layout: Layout, max_norm: float | None = None,
                     on_excess_norm: Literal["reject", "clip"] = "reject",
                     send_gradient: bool = False) -> ValidatedUpdates:
    """Check every update (duplicates, round, id, layout, finiteness, norm, signal)."""
    out = ValidatedUpdates()
    for up in updates:
        out.nbytes += int(np.asarray(up.vector).nbytes)
        if up.signal is not None:
            out.nbytes += int(np.asarray(up.signal).nbytes)
        try:
            if up.client_id in out.ids:
                raise UpdateRejected("duplicate update in this round")
            vec = check_update(up, round_num, num_clients, layout, max_norm, on_excess_norm)
            signal = check_signal(up, layout) if send_gradient else None
        except UpdateRejected as exc:
            out.rejected[int(up.client_id)] = str(exc)
            log.warning("round %d: rejected update of client %s: %s", round_num,
                        up.client_id, exc)
            continue
        if vec is not up.vector:
            out.modified.append(int(up.client_id))
        if signal is not None:
            out.signals.append(signal)
        out.vecs.append(vec)
        out.ids.append(int(up.client_id))
        out.accepted.append(up)
    return out
