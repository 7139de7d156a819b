"""What a run shares between its parts: :class:`RunContext` (config, outputs, shards, the live
actors) and the :class:`RunCallback` protocol of its observers (progress display, MLflow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedbip_ray.config import Config
from fedbip_ray.core.strategies import Strategy
from fedbip_ray.data.shards import ShardSet
from fedbip_ray.runtime.messages import AggregationReport, ShardRef
from fedbip_ray.runtime.rows import Row
from fedbip_ray.storage import Location

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from fedbip_ray.runtime.base_store import BaseHandle
    from fedbip_ray.runtime.checkpoint import CheckpointWriter
    from fedbip_ray.runtime.cluster import Placement
    from fedbip_ray.runtime.outputs import RunOutputs
    from fedbip_ray.runtime.progress import PhaseProgress


@dataclass
class RunContext:
    """What callbacks may look at: config, output dir, shards and the live actors.

    ``output`` is a local directory holding config.yaml, metrics.jsonl, summary.json and
    shards/: the run's output itself, or the local working copy of a storage URI.

    ``strategy`` is built once per run from ``cfg.strategy``. ``first_round`` is 1 for a
    fresh run, R + 1 when resumed from round R's checkpoint (``history`` then already holds
    rows 1..R).
    """

    cfg: Config
    output: Path
    shards: ShardSet
    strategy: Strategy | None = None
    server: ActorHandle | None = None
    actors: list[ActorHandle] = field(default_factory=list)
    history: list[Row] = field(default_factory=list)
    shard_refs: dict[int, ShardRef] = field(default_factory=dict)
    first_round: int = 1
    checkpoints: CheckpointWriter | None = None
    # {phase: {client: seconds its last call took}}: the dispatch order of the next phase
    call_seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    progress: PhaseProgress | None = None  # progress inside a round (None: silent)
    # run metadata saved in every checkpoint and restored on resume (e.g. the MLflow run id);
    # callbacks may add to it in on_start
    meta: dict[str, Any] = field(default_factory=dict)
    outputs: RunOutputs | None = None  # where the run writes (``output`` is its local side)
    round: int = 0  # the round in progress
    placement: Placement | None = None  # the client actors' bundles and nodes (cluster.provision)
    base: BaseHandle | None = None  # the shared frozen base model (runtime.base_store)

    def actor_index(self, client_id: int) -> int:
        """The client's home actor (its calls go there unless another actor is idle first)."""
        return client_id % len(self.actors)

    @property
    def checkpoint_root(self) -> Path | Location:
        """Where the run's checkpoints go (its storage location, else ``output/checkpoints``)."""
        return self.outputs.checkpoints if self.outputs is not None else self.output / "checkpoints"

    def actor_for(self, client_id: int) -> ActorHandle:
        return self.actors[self.actor_index(client_id)]


class RunCallback(Protocol):
    """Observers of a run (progress display, MLflow). A callback may also define
    ``on_error(run, exc)``: called once when the run fails (then the error is re-raised).
    In ``on_round`` the round's checkpoint may still be being written: a callback that reads
    it calls ``run.checkpoints.wait()`` first."""

    def on_start(self, run: RunContext) -> None: ...
    def on_round(self, run: RunContext, row: Row, report: AggregationReport) -> None: ...
    def on_end(self, run: RunContext, summary: dict[str, Any]) -> None: ...
