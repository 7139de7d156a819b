"""ClientActor: a thin Ray shell around :class:`LocalTrainer`.

One actor loads the base model once and serves one client (or, in pool mode, several clients
whose data shards it was given). It keeps no federated state: every call receives the client's
personalized adapter state from the server actor.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray

from fedbip_ray.config import Config
from fedbip_ray.data.shards import read_shard
from fedbip_ray.runtime.messages import ClientUpdate, EvalResult
from fedbip_ray.runtime.trainer import make_trainer, seed_for


@ray.remote(max_restarts=3, max_task_retries=0)
class ClientActor:
    """Ray actor; ``shards`` maps client id -> ObjectRef of that client's Parquet bytes
    (passed nested, so an actor fetches only the shards of clients it actually serves)."""

    def __init__(self, cfg: dict[str, Any], shards: dict[int, Any], num_labels: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = Config.model_validate(cfg)
        self.shards = shards
        self.trainer = make_trainer(self.cfg, num_labels)
        self._data: dict[int, dict[str, Any]] = {}

    def info(self) -> dict[str, Any]:
        """Layout and size of the adapter; also a readiness probe."""
        return {"layout": self.trainer.layout.to_dict(), "pid": os.getpid(),
                "device": str(self.trainer.device)}

    def initial_state(self) -> np.ndarray:
        """(D,) float32 initial adapter state (identical for every client)."""
        return self.trainer.initial_state()

    def _client_data(self, client_id: int) -> dict[str, Any]:
        if client_id not in self._data:
            ref = self.shards.get(client_id)
            if ref is None:
                raise KeyError(f"this actor holds no shard for client {client_id}")
            frames = read_shard(ray.get(ref))
            self._data[client_id] = {s: self.trainer.encode(f) for s, f in frames.items()}
        return self._data[client_id]

    def fit(self, client_id: int, state: np.ndarray, round_num: int, prox_mu: float = 0.0) -> ClientUpdate:
        """Train ``state`` on the client's train split; return the task vector (D,) float32."""
        data = self._client_data(client_id)["train"]
        self.trainer.load_state(state)
        metrics = self.trainer.train(
            data, self.cfg.train.local_epochs, seed_for(self.cfg.seed, client_id, round_num), prox_mu
        )
        tau = self.trainer.current_state() - np.asarray(state, dtype=np.float32)
        return ClientUpdate(client_id, round_num, tau.astype(np.float32, copy=False),
                            self.trainer.layout.to_dict(), len(data), metrics)

    def evaluate(self, client_id: int, state: np.ndarray, round_num: int,
                 splits: tuple[str, ...] = ("val", "test"), finetune_epochs: int = 0) -> EvalResult:
        """Accuracy/loss of ``state`` on the client's own splits (optionally after a local
        fine-tune of ``finetune_epochs`` epochs, which is not kept)."""
        data = self._client_data(client_id)
        self.trainer.load_state(state)
        if finetune_epochs > 0:
            self.trainer.train(data["train"], finetune_epochs, seed_for(self.cfg.seed, client_id, round_num, 7))
        return EvalResult(client_id, round_num, {s: self.trainer.evaluate(data[s]) for s in splits})

    def export_adapter(self, client_id: int, state: np.ndarray) -> dict[str, bytes]:
        """The client's adapter in peft format (``PeftModel.from_pretrained`` loads it), as
        {file name: bytes} so it can travel back from any node."""
        import tempfile
        from pathlib import Path

        self.trainer.load_state(state)
        with tempfile.TemporaryDirectory() as tmp:
            self.trainer.model.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
