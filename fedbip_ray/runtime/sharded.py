"""A sharded server (``federation.server_shards: K > 1``): ``K`` :class:`BlockActor` s, each
holding one column block of every client's state (split at module boundaries, spread over the
cluster's nodes), and one small :class:`CoordinatorActor` that turns their summaries into the
round's weights. :class:`ShardedServer` gives the driver the same calls as a ``ServerActor``
handle (``server.method.remote(...)``) and chains each round's steps between the actors by
ObjectRef, so the driver holds no ``(N, D)`` or ``N x N`` array: it fetches the report only.

Each client actor sends every shard its slice of the update directly (``fit`` returns ``K``
update refs, one per block) and fetches its state as ``K`` slices (:class:`StateSlices`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import ray

from fedbip_ray.config import ConfigError
from fedbip_ray.core.blocks import Block, split_layout
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import ServerSettings, StateSlices
from fedbip_ray.runtime.server import aggregate_round
from fedbip_ray.runtime.server_block import BlockActor
from fedbip_ray.runtime.server_coordinator import CoordinatorActor

__all__ = ["ShardedServer", "ShardedState", "remote_call"]


def remote_call(obj: Any, method: str, *args: Any) -> Any:
    return getattr(obj, method).remote(*args)


class _Method:
    """``handle.name.remote(...)``, as on an actor handle."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.remote = fn


class ShardedState(tuple):
    """What :meth:`ShardedServer.state_dict` gives once fetched: ``(files, layout)`` with
    ``files`` {file name: tensors}: the coordinator's ``server.safetensors`` (similarity,
    memory) and one ``server_shard_KKK.safetensors`` per block (its states and init)."""


class ShardedServer:
    """The driver's handle on a sharded server (see the module docstring).

    ``options``: Ray options of each block actor (its CPUs and memory); ``threads``: each
    block's BLAS threads. The block actors start once the adapter's layout is known
    (:meth:`initialize` or :meth:`load_state_dict`)."""

    def __init__(self, settings: ServerSettings, shards: int, threads: int = 1,
                 options: Mapping[str, Any] | None = None,
                 coordinator_options: Mapping[str, Any] | None = None) -> None:
        self.settings, self.shards, self.threads = settings, int(shards), int(threads)
        self.options = dict(options or {})
        self.coordinator = CoordinatorActor.options(**dict(coordinator_options or {})).remote(
            settings)
        self.blocks: list[Any] = []
        self.bounds: list[Block] = []
        self.layout: Layout | None = None
        for name in ("initialize", "load_state_dict", "aggregate_refs", "get_state",
                     "gate_local", "apply_gate", "ala_weights", "apply_ala", "state_dict",
                     "keep_last_round",
                     "last_round", "all_states"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def _start(self, layout: Layout) -> None:
        if self.blocks:
            return
        try:
            self.bounds, self.layout = split_layout(layout, self.shards), layout
        except ValueError as exc:
            raise ConfigError(f"federation.server_shards={self.shards}: {exc}") from None
        strategy, n = self.settings.strategy, self.settings.num_clients
        self.blocks = [BlockActor.options(**self.options).remote(b, n, strategy, self.threads)
                       for b in self.bounds]

    def kill(self) -> None:
        """Stop the coordinator and every block actor (those already gone are skipped)."""
        for actor in [self.coordinator, *self.blocks]:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # -- the calls of a ServerActor handle ---------------------------------------------------
    def _initialize(self, init: Any, layout: Layout) -> list[Any]:
        self._start(layout)
        return [self.coordinator.initialize.remote(layout),
                *(b.initialize.remote(init) for b in self.blocks)]

    def _load_state_dict(self, tensors: Mapping[str, np.ndarray], layout: Layout) -> list[Any]:
        states = np.asarray(tensors["states"], dtype=np.float32)
        n = self.settings.num_clients
        if states.shape != (n, layout.size):
            raise ValueError(f"checkpoint holds states {states.shape}, run needs "
                             f"({n}, {layout.size})")
        self._start(layout)
        init = np.asarray(tensors["init"], dtype=np.float32)
        refs = [self.coordinator.load.remote(layout, tensors.get("similarity"),
                                             tensors.get("memory"))]
        for actor, b in zip(self.blocks, self.bounds, strict=True):
            refs.append(actor.load.remote(np.ascontiguousarray(states[:, b.cols]),
                                          init[b.cols]))
        return refs

    def _aggregate_refs(self, round_num: int, client_ids: list[int], payloads: list[Any],
                        min_accepted: int = 1) -> Any:
        """``payloads``: per client, its ``K`` update-slice refs (a failed call's refs carry
        its error). Returns the ref of the round's report."""
        per_block = [[p[k] for p in payloads] for k in range(len(self.blocks))]
        return aggregate_round(remote_call, self.blocks, self.coordinator, round_num,
                               list(client_ids), per_block, min_accepted,
                               self.settings.strategy.client_options.send_gradient)

    def _get_state(self, client_id: int) -> StateSlices:
        return StateSlices(tuple(b.get_state.remote(client_id) for b in self.blocks))

    def _gate_local(self, client_id: int) -> StateSlices:
        return StateSlices(tuple(b.gate_local.remote(client_id) for b in self.blocks))

    def _apply_gate(self, mixes: dict[int, float]) -> list[Any]:
        return [b.apply_gate.remote(mixes) for b in self.blocks]

    def _ala_weights(self, client_id: int) -> Any:
        return self.coordinator.ala_weights.remote(client_id)

    def _apply_ala(self, round_num: int, client_ids: list[int], results: list[Any]) -> list[Any]:
        """Every block sets its columns of the clients' states, the coordinator keeps their
        weights (each fetches the results itself)."""
        assert self.layout is not None
        return [self.coordinator.remember_ala.remote(round_num, client_ids, results),
                *(b.apply_ala.remote(round_num, client_ids, results, self.layout.size)
                  for b in self.blocks)]

    def _state_dict(self) -> list[Any]:
        """Refs of the coordinator's and every block's state (see :func:`fetch_state`)."""
        return [self.coordinator.state_dict.remote(),
                *(b.state_dict.remote() for b in self.blocks)]

    def fetch_state(self, refs: list[Any]) -> ShardedState:
        """The fetched :meth:`state_dict` as per-file tensors (one file per shard)."""
        assert self.layout is not None
        layout = self.layout
        coord, *blocks = ray.get(refs)
        files = {"server.safetensors": coord}
        for k, block in enumerate(blocks):
            files[shard_file(k)] = block
        return ShardedState((files, layout))

    def _unsupported(self, *_: Any) -> Any:
        raise NotImplementedError("replay recording and all_states need one server block "
                                  "(federation.server_shards: 1)")

    _keep_last_round = _last_round = _all_states = _unsupported


def shard_file(k: int) -> str:
    """Checkpoint file of shard ``k``."""
    return f"server_shard_{k:03d}.safetensors"
