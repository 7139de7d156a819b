"""ClientActor: a thin Ray shell around a trainer
(:func:`fedbip_ray.training.registry.make_trainer`).

One actor loads the base model once and serves one client (or, in pool mode, several clients).
It keeps no federated state: every call receives the client's personalized adapter state from
the server actor and a :class:`ShardRef` of the client's data, so a restarted actor (Ray
restarts it up to ``max_restarts`` times after a crash) simply carries on with its next call.
The trainer runs on the GPUs Ray assigned this actor (:mod:`fedbip_ray.training.device`).

Test-only fault injection: with ``FEDBIP_TEST_POISON`` set, ``fit`` results go through
:func:`fedbip_ray.runtime.faults.poison_update`.
"""

from __future__ import annotations

import gc
import os
import warnings
from typing import Any

import numpy as np
import ray

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.core.gate import mix_candidates
from fedbip_ray.core.interface import ALAOptions
from fedbip_ray.data.shards import read_shard
from fedbip_ray.runtime.actor_pool import recalled_config, remember_config
from fedbip_ray.runtime.base_store import BaseHandle, fetch_base
from fedbip_ray.runtime.messages import (
    ALAResult,
    ClientUpdate,
    EvalResult,
    ShardRef,
    resolve_state,
)
from fedbip_ray.training.device import torch_device
from fedbip_ray.training.protocol import Trainer
from fedbip_ray.training.seeds import seed_for

FAULTS_ENV = "FEDBIP_TEST_POISON"  # = fedbip_ray.runtime.faults.POISON_ENV
# Errors that mean "this model/adapter config cannot be built": reported as one-line config
# errors by the driver instead of killing (and restarting) the actor.
_INPUT_ERRORS = (ConfigError, OSError, ValueError, KeyError, ImportError)


def _build_trainer(cfg: Config, num_labels: int, node_id: str,
                   base: BaseHandle | None = None) -> Trainer:
    """The trainer on the device Ray's GPU assignment allows, over the node's shared frozen
    base when ``base`` is given (:mod:`fedbip_ray.runtime.base_store`). Imported inside the
    actor only (torch, transformers): the driver, which needs this module to start actors,
    never loads torch."""
    from fedbip_ray.training.registry import make_trainer

    device = torch_device(cfg.resources.device, ray.get_gpu_ids(), node_id)
    return make_trainer(cfg, num_labels, device, fetch_base(base))


def _with_faults(tau: np.ndarray, client_id: int) -> np.ndarray:
    """``tau`` as the test-only fault injection leaves it (unchanged unless the env var is set)."""
    if not os.environ.get(FAULTS_ENV):
        return tau
    from fedbip_ray.runtime.faults import poison_update

    return poison_update(tau, client_id)


def _scores(trainer: Trainer, data: dict[str, Any], split: str, seed: int) -> Any:
    """``trainer``'s scores on ``data[split]``; a dual adapter (FedDPA) also gets the
    client's training instances, against which it weighs its adapters per instance."""
    if getattr(trainer, "dual", None) is None:
        return trainer.evaluate(data[split])
    return trainer.evaluate(data[split], data["train"], seed)  # type: ignore[call-arg]


class TaskCancelled(RuntimeError):
    """The driver cancelled this call (a straggler past the round deadline)."""


def one_line(exc: BaseException) -> str:
    """First line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _abort_if_cancelled(_module: Any, _inputs: Any) -> None:
    """Forward pre-hook: stop a cancelled call at the next batch (Ray cannot interrupt a
    running task of a synchronous actor, it only flags it)."""
    if ray.get_runtime_context().is_canceled():
        raise TaskCancelled("cancelled by the driver (past the round deadline)")


def check_model_on_node(name: str) -> None:
    """A model given as a local directory must exist on the node that loads it (the driver
    checked its own disk only); ConfigError naming the path otherwise."""
    path = os.path.expanduser(name)
    if os.path.isabs(path) and not os.path.exists(path):
        raise ConfigError(f"model.name '{name}': directory not found on this worker node (put it "
                          "on storage every node mounts, or in the nodes' image)")


def node_suffix(node_id: str) -> str:
    """`` (node 1a2b3c4d5e6f)`` on a cluster of several nodes, else nothing."""
    try:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:  # noqa: BLE001 - naming the node is a courtesy
        return ""
    return f" (node {node_id[:12]})" if alive > 1 else ""


def quiet_library_warnings() -> None:
    """Silence the deprecation notices transformers and peft print in every actor (they are
    about their own internals, not about anything a user configured)."""
    for module in ("transformers", "peft", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


@ray.remote(max_restarts=3, max_task_retries=0)
class ClientActor:
    """Ray actor wrapping one trainer (:class:`fedbip_ray.training.protocol.Trainer`). ``cfg`` is
    the run's validated :class:`Config`.

    A model that cannot be built is not raised from the constructor (that would make Ray
    restart the actor in vain and print a traceback): :meth:`info` reports it as ``error``.
    """

    def __init__(self, cfg: Config, num_labels: int, shared_base: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        quiet_library_warnings()
        self._configure(*recalled_config((cfg, num_labels, shared_base)))

    def reset(self, cfg: Config, num_labels: int, shared_base: bool = False) -> None:
        """Serve a new run (a pooled actor, :mod:`fedbip_ray.runtime.actor_pool`): as if
        just started with these arguments, which a restart of this actor will also use."""
        remember_config((cfg, num_labels, shared_base))
        self.trainer = self._data = None  # the old model's memory goes before the new one's
        gc.collect()
        self._configure(cfg, num_labels, shared_base)

    def _configure(self, cfg: Config, num_labels: int, shared_base: bool) -> None:
        self.cfg = cfg  # validated once by the driver, like the server's ServerSettings
        self._data: dict[int, dict[str, Any]] = {}
        # {client: (round, (D,) state after its own training)} for this round's validation gate
        self._trained: dict[int, tuple[int, np.ndarray]] = {}
        self.error: str | None = None
        self.trainer: Trainer | None = None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.num_labels = num_labels
        if not shared_base:  # else the first call, use_base, builds the model
            self._build(None)

    def use_base(self, base: BaseHandle) -> None:
        """Build the model over the run's shared frozen base (the first call of an actor
        started with ``shared_base``; the reference comes in a call, not in the constructor,
        whose object-store arguments Ray does not keep for restarts). A restarted actor,
        which gets no such call, builds a private copy on its first call."""
        if self.trainer is None and self.error is None:
            self._build(base)

    def _build(self, base: BaseHandle | None) -> None:
        try:
            check_model_on_node(self.cfg.model.name)
            self.trainer = _build_trainer(self.cfg, self.num_labels, self.node_id, base)
        except _INPUT_ERRORS as exc:
            self.error = one_line(exc) if isinstance(exc, ConfigError) else (
                f"model '{self.cfg.model.name}': {type(exc).__name__}: {one_line(exc)}")
            self.error += node_suffix(self.node_id)
            return
        self.trainer.model.register_forward_pre_hook(_abort_if_cancelled)

    def info(self) -> dict[str, Any]:
        """Layout and size of the adapter, pid, Ray node id, device, and ``error`` if the model
        could not be built; also a readiness probe."""
        if self.trainer is None and self.error is None:
            self._build(None)
        if self.trainer is None:
            return {"error": self.error, "pid": os.getpid(), "node_id": self.node_id,
                    "device": None}
        shared = getattr(self.trainer, "shared_base", None)
        return {"layout": self.trainer.layout.to_dict(), "pid": os.getpid(),
                "node_id": self.node_id,
                "shared_base_bytes": shared.nbytes if shared is not None else 0,
                "device": str(self.trainer.device), "error": None,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def _ready(self) -> Trainer:
        if self.trainer is None and self.error is None:
            self._build(None)
        if self.trainer is None:
            raise RuntimeError(f"client actor has no model: {self.error}")
        return self.trainer

    def initial_state(self) -> np.ndarray:
        """(D,) float32 initial adapter state (identical for every client)."""
        return self._ready().initial_state()

    def _client_data(self, client_id: int, shard: ShardRef | None) -> dict[str, Any]:
        if client_id not in self._data:
            if shard is None or shard.client_id != client_id:
                raise KeyError(f"no data shard for client {client_id}")
            frames = read_shard(ray.get(shard.ref))
            self._data[client_id] = {s: self._ready().encode(f) for s, f in frames.items()}
        return self._data[client_id]

    def fit(self, client_id: int, state: np.ndarray, round_num: int, prox_mu: float = 0.0,
            shard: ShardRef | None = None, gradient: bool = False,
            keep: bool = False) -> ClientUpdate:
        """Train ``state`` on the client's train split; return the task vector (D,) float32
        (and, with ``gradient``, the negated gradient sum of the round as ``signal``). With
        ``keep`` the trained state ``state + τ`` stays in the actor for this round's
        :meth:`score_mixes` (so the server need not send it back)."""
        trainer = self._ready()
        state = resolve_state(state)
        self._trained = {c: v for c, v in self._trained.items() if v[0] == round_num}
        data = self._client_data(client_id, shard)["train"]
        trainer.load_state(state)
        if gradient:
            trainer.start_gradient_sum()
        try:
            metrics = trainer.train(
                data, self.cfg.train.local_epochs, seed_for(self.cfg.seed, client_id, round_num),
                prox_mu
            )
        finally:
            signal = trainer.stop_gradient_sum() if gradient else None
        metrics["peak_rss_mib"] = peak_rss_mib()
        start = np.asarray(state, dtype=np.float32)
        tau = trainer.current_state() - start
        if keep:  # bit for bit what the server forms as its own state + τ
            self._trained[client_id] = (round_num, start + tau)
        tau = _with_faults(tau, client_id)
        return ClientUpdate(client_id, round_num, tau.astype(np.float32, copy=False),
                            trainer.layout, len(data), metrics, signal)

    @ray.method(num_returns=2)
    def fit_receipt(self, *args: Any, blocks: list[Any] | None = None,
                    **kwargs: Any) -> tuple[Any, ...]:
        """:meth:`fit` as two results: a small receipt that tells the driver the call is done
        (the client id, fetched by the driver; an error there names an actor death), and the
        update, which only the server fetches. With a sharded server's ``blocks`` (called with
        ``num_returns=1 + K``): the receipt, then the update's slice for each block."""
        from fedbip_ray.runtime.server import slice_update

        update = self.fit(*args, **kwargs)
        if blocks:
            return (update.client_id, *slice_update(update, blocks))
        return update.client_id, update

    def evaluate(self, client_id: int, state: np.ndarray, round_num: int,
                 splits: tuple[str, ...] = ("val", "test"), finetune_epochs: int = 0,
                 shard: ShardRef | None = None) -> EvalResult:
        """Accuracy/loss of ``state`` on the client's own splits (optionally after a local
        fine-tune of ``finetune_epochs`` epochs, which is not kept); a causal LM whose data
        names tasks adds ``per_task`` {task: score} to each split."""
        trainer = self._ready()
        data = self._client_data(client_id, shard)
        trainer.load_state(resolve_state(state))
        if finetune_epochs > 0:
            trainer.train(data["train"], finetune_epochs,
                          seed_for(self.cfg.seed, client_id, round_num, 7))
        seed = seed_for(self.cfg.seed, client_id, round_num, 13)
        return EvalResult(client_id, round_num,
                          {s: _scores(trainer, data, s, seed) for s in splits})

    def score_mixes(self, client_id: int, aggregate: np.ndarray, mixes: tuple[float, ...],
                    round_num: int, shard: ShardRef | None = None,
                    local: np.ndarray | None = None) -> list[dict[str, float]] | None:
        """Validation scores of ``local + λ (aggregate − local)`` for each ``λ`` in ``mixes``
        (see :mod:`fedbip_ray.core.gate`); ``aggregate`` and ``local`` are (D,). Without
        ``local`` the state kept by this round's ``fit(keep=True)`` is used; None when there is
        none (e.g. the actor was restarted): the caller then sends ``local``."""
        trainer = self._ready()
        aggregate, local = resolve_state(aggregate), resolve_state(local)
        kept = self._trained.pop(client_id, None)
        if local is None:
            if kept is None or kept[0] != round_num:
                return None
            local = kept[1]
        data = self._client_data(client_id, shard)["val"]
        scores = []
        for cand in mix_candidates(local, aggregate, mixes):
            trainer.load_state(cand)
            scores.append(trainer.evaluate(data))
        return scores

    @ray.method(num_returns=2)
    def adapt_local(self, client_id: int, aggregate: np.ndarray, weights: np.ndarray | None,
                    round_num: int, opts: ALAOptions, shard: ShardRef | None = None,
                    local: np.ndarray | None = None) -> tuple[Any, ALAResult | None]:
        """FedALA's adaptive local aggregation (:mod:`fedbip_ray.training.ala`) of the
        client's own trained state (kept by this round's ``fit(keep=True)``, or ``local``)
        and the ``aggregate`` (both (D,)), from ``weights`` (P,) (None: first time). Returns
        a small receipt ``(epochs, mean W)`` and the :class:`ALAResult`; ``(None, None)``
        when the actor holds no trained state (the caller then sends ``local``)."""
        from fedbip_ray.training.ala import adaptive_local_aggregation

        trainer = self._ready()
        aggregate, local = resolve_state(aggregate), resolve_state(local)
        kept = self._trained.pop(client_id, None)
        if local is None:
            if kept is None or kept[0] != round_num:
                return None, None
            local = kept[1]
        data = self._client_data(client_id, shard)["train"]
        out = adaptive_local_aggregation(trainer, data, local, aggregate, weights, opts,
                                         seed_for(self.cfg.seed, client_id, round_num, 11))
        mean_w = float(out.weights.mean()) if out.weights is not None and out.weights.size \
            else float("nan")
        return (out.epochs, mean_w), ALAResult(client_id, round_num, out.state, out.weights,
                                               out.epochs, out.loss)

    def export_adapter(self, client_id: int, state: np.ndarray) -> dict[str, bytes]:
        """The client's adapter in peft format (``PeftModel.from_pretrained`` loads it), as
        {file name: bytes} so it can travel back from any node."""
        import tempfile
        from pathlib import Path

        trainer = self._ready()
        trainer.load_state(resolve_state(state))
        with tempfile.TemporaryDirectory() as tmp:
            trainer.model.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
