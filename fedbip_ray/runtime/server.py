"""Server: per-client personalized states + core aggregation. ``ServerActor`` is its Ray shell.

The driver hands the server the clients' update ObjectRefs as they are (nested in a list, not
fetched); the server fetches each one itself, so one failed client cannot fail the others.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedbip_ray.core.strategies import AggregationInput, make_strategy
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.core.validation import UpdateRejected, validate_update
from fedbip_ray.runtime.messages import ClientUpdate

log = logging.getLogger("fedbip.server")


class FederatedServer:
    """Holds ``states`` (num_clients, D) float32: each client's personalized adapter.

    ``groups`` (num_clients,) are the true groups when known (oracle strategy, diagnostics).
    """

    def __init__(self, strategy: str, params: dict[str, Any], num_clients: int,
                 groups: list[int] | None = None, max_norm: float | None = None,
                 on_excess_norm: str = "reject") -> None:
        self.strategy = make_strategy(strategy, params)
        self.num_clients = num_clients
        self.groups = np.asarray(groups, dtype=np.int64) if groups is not None else None
        self.max_norm, self.on_excess_norm = max_norm, on_excess_norm
        self.layout: Layout | None = None
        self.init: np.ndarray | None = None
        self.states: np.ndarray | None = None
        self.similarity: np.ndarray | None = None  # (num_clients, num_clients) smoothed, NaN unknown

    # -- state ------------------------------------------------------------------------------
    def initialize(self, init: np.ndarray, layout: dict[str, Any]) -> int:
        """Every client starts from the same initial adapter ``init`` (D,). Returns D."""
        self.layout = Layout.from_dict(layout)
        self.init = np.asarray(init, dtype=np.float32).copy()
        self.states = np.tile(self.init, (self.num_clients, 1))
        self.similarity = np.full((self.num_clients, self.num_clients), np.nan)
        return self.layout.size

    def get_state(self, client_id: int) -> np.ndarray:
        """(D,) float32 personalized state of one client."""
        assert self.states is not None, "server not initialized"
        return self.states[client_id].copy()

    def all_states(self) -> np.ndarray:
        assert self.states is not None
        return self.states

    # -- aggregation ------------------------------------------------------------------------
    def check(self, update: ClientUpdate, round_num: int) -> np.ndarray:
        """Validated (possibly clipped) task vector, or raises UpdateRejected."""
        assert self.layout is not None
        if update.round != round_num:
            raise UpdateRejected(f"update is for round {update.round}, expected {round_num}")
        if not 0 <= update.client_id < self.num_clients:
            raise UpdateRejected(f"unknown client id {update.client_id}")
        if update.num_examples <= 0:
            raise UpdateRejected(f"num_examples must be positive, got {update.num_examples}")
        vec, _ = validate_update(np.asarray(update.vector), Layout.from_dict(update.layout),
                                 self.layout, max_norm=self.max_norm,
                                 on_excess_norm=self.on_excess_norm)  # type: ignore[arg-type]
        return vec

    def aggregate(self, round_num: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Validate ``updates`` and apply the strategy to the clients that sent a valid one.

        Returns a report: accepted/rejected client ids, the similarity and weight matrices
        (participants x participants) and the bytes received.
        """
        assert self.states is not None and self.layout is not None
        ids, vecs, counts, rejected, nbytes = [], [], [], {}, 0
        for up in updates:
            nbytes += int(np.asarray(up.vector).nbytes)
            try:
                if up.client_id in ids:
                    raise UpdateRejected("duplicate update in this round")
                vecs.append(self.check(up, round_num))
                ids.append(up.client_id)
                counts.append(up.num_examples)
            except UpdateRejected as exc:
                rejected[int(up.client_id)] = str(exc)
                log.warning("round %d: rejected update of client %s: %s", round_num, up.client_id, exc)
        report: dict[str, Any] = {"round": round_num, "accepted": ids, "rejected": rejected,
                                  "bytes_in": nbytes, "similarity": None, "weights": None,
                                  "train_losses": [float(u.metrics.get("train_loss", float("nan")))
                                                   for u in updates if u.client_id in ids]}
        if not ids:
            return report
        idx = np.asarray(ids, dtype=np.int64)
        prev = self.similarity[np.ix_(idx, idx)] if self.similarity is not None else None
        if prev is not None and np.isnan(prev).any():
            prev = None
        inp = AggregationInput(
            states=self.states[idx], deltas=np.stack(vecs).astype(np.float32, copy=False),
            counts=np.asarray(counts, dtype=np.int64), layout=self.layout, init=self.init,
            groups=self.groups[idx] if self.groups is not None else None, prev_similarity=prev,
        )
        result = self.strategy.aggregate(inp)
        self.states[idx] = result.states
        if result.similarity is not None and self.similarity is not None:
            self.similarity[np.ix_(idx, idx)] = result.similarity
        report["similarity"] = None if result.similarity is None else np.asarray(result.similarity).tolist()
        report["weights"] = np.asarray(result.weights).tolist()
        return report

    # -- checkpoints (safetensors + JSON; never pickle) ----------------------------------------
    def save(self, directory: str) -> None:
        """Write server state into ``directory`` (the caller renames it into place)."""
        from safetensors.numpy import save_file

        assert self.states is not None and self.init is not None and self.layout is not None
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"states": self.states, "init": self.init}
        if self.similarity is not None:
            tensors["similarity"] = self.similarity.astype(np.float64)
        save_file(tensors, str(out / "server.safetensors"))
        (out / "layout.json").write_text(json.dumps(self.layout.to_dict()))

    def load(self, directory: str) -> int:
        """Restore server state written by :meth:`save`. Returns D."""
        from safetensors.numpy import load_file

        d = Path(directory)
        tensors = load_file(str(d / "server.safetensors"))
        layout = Layout.from_dict(json.loads((d / "layout.json").read_text()))
        states = tensors["states"]
        if states.shape != (self.num_clients, layout.size):
            raise ValueError(f"checkpoint holds states {states.shape}, run needs "
                             f"({self.num_clients}, {layout.size})")
        self.layout, self.init, self.states = layout, tensors["init"], states.copy()
        self.similarity = tensors.get("similarity")
        if self.similarity is None:
            self.similarity = np.full((self.num_clients, self.num_clients), np.nan)
        return layout.size


@ray.remote(max_restarts=0)
class ServerActor(FederatedServer):
    """The server as a Ray actor: fetches update refs itself (driver never touches them)."""

    def aggregate_refs(self, round_num: int, client_ids: list[int], refs: list[Any]) -> dict[str, Any]:
        """``refs`` are ObjectRefs of :class:`ClientUpdate`; failures are reported, not raised."""
        updates, failed = [], {}
        for cid, ref in zip(client_ids, refs, strict=True):
            try:
                up = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any client failure is isolated
                failed[int(cid)] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                continue
            if not isinstance(up, ClientUpdate) or up.client_id != cid:
                failed[int(cid)] = "malformed update message"
                continue
            updates.append(up)
        report = self.aggregate(round_num, updates)
        report["failed"] = failed
        return report
