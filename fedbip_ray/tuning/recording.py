"""Recording a run's task vectors for replay tuning, and reading a recording back.

If the server actor offers ``last_round()`` the recorder stores the server's own copy of the
accepted task vectors. Otherwise it recovers them from the checkpoints: round t's checkpoint
holds the states after aggregation; with the logged weights W (participants x participants),
``after = before + W @ tau`` for ``fedbip``, ``fedbip-paper`` and ``local`` (W = I, exact), so
τ = W⁻¹ (after - before). That needs an invertible W: FedBip's ``self_similarity: max-peer``
gives identical rows to clients whose peers are each other (W singular), so record with
``self_similarity: one`` or ``strategy.name: local`` there. The recorder refuses strategies
where the relation does not hold (fedavg, fedamp, layer-wise) and runs with DP noise (the noise
would be replayed as if it were signal).

Layout of ``RUN/replay/``: ``meta.json``, ``layout.json``, ``init.safetensors`` and one
``round_XXXXX.safetensors`` per recorded round (see :class:`TaskVectorRecorder`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_ray.config import Config, ConfigError, load_config
from fedbip_ray.core.taskvector import Layout

RECORD_DIR = "replay"
#: Strategies whose server step is ``after = before + W @ tau`` with W the logged weights.
RECORDABLE = ("fedbip", "fedbip-paper", "local")
MAX_CONDITION = 1e6


def recover_deltas(before: np.ndarray, after: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """τ ``(N, D)`` float32 from ``after = before + weights @ τ`` (``before``/``after`` ``(N, D)``,
    ``weights`` ``(N, N)``), solved in float64. ValueError if ``weights`` is ill-conditioned."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    if w.shape != (n, n) or before.shape != after.shape or before.shape[0] != n:
        raise ValueError(f"shapes do not match: weights {w.shape}, "
                         f"states {before.shape}/{after.shape}")
    cond = float(np.linalg.cond(w))
    if not np.isfinite(cond) or cond > MAX_CONDITION:
        raise ValueError(f"weight matrix is singular or ill-conditioned (cond {cond:.3g}); "
                         "task vectors cannot be recovered")
    diff = after.astype(np.float64) - before.astype(np.float64)
    return np.linalg.solve(w, diff).astype(np.float32)


def _checkpoint_states(output: Path,
                       round_num: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(states after round ``round_num`` (N, D), init (D,), layout dict) from its checkpoint."""
    from fedbip_ray.runtime.checkpoint import checkpoint_name, read_checkpoint

    ckpt = read_checkpoint(output / "checkpoints" / checkpoint_name(round_num), round_num)
    return ckpt.tensors["states"], ckpt.tensors["init"], ckpt.layout


def _exported_deltas(server: Any, round_num: int, clients: list[int]) -> np.ndarray | None:
    """The server's own copy of the round's accepted task vectors, where the server actor
    offers ``last_round()`` (``{"round", "clients", "deltas"}``); None otherwise."""
    method = getattr(server, "last_round", None)
    if method is None:
        return None
    import ray

    last = ray.get(method.remote())
    if not last or int(last["round"]) != round_num or [int(c) for c in last["clients"]] != clients:
        return None
    return np.asarray(last["deltas"], dtype=np.float32)


def check_recordable(cfg: Config) -> None:
    """ConfigError (one line) when a run with ``cfg`` cannot be recorded for replay."""
    if cfg.strategy.name not in RECORDABLE:
        raise ConfigError(f"strategy.name '{cfg.strategy.name}': task vectors can be recorded "
                          f"only under {', '.join(RECORDABLE)}")
    if cfg.federation.checkpoint_every != 1:
        raise ConfigError(f"federation.checkpoint_every={cfg.federation.checkpoint_every}: "
                          "recording task vectors reads every round's checkpoint (set it to 1)")
    privacy = getattr(cfg, "privacy", None)
    if privacy is not None and getattr(privacy, "enabled", False):
        raise ConfigError("privacy.clip_norm: a run with DP noise cannot be recorded for replay")
    if cfg.federation.server_shards != 1:
        raise ConfigError(f"federation.server_shards={cfg.federation.server_shards}: recording "
                          "task vectors for replay needs one server block (set it to 1)")


class TaskVectorRecorder:
    """Run callback writing ``OUTPUT/replay/round_XXXXX.safetensors`` (``clients`` (N_t,) int64,
    ``deltas`` (N_t, D) float32, ``weights`` (N_t, N_t) float64) and ``meta.json``.

    Reads the run's own checkpoints (written by the driver every round), the round report and,
    where the server actor offers it, the round's task vectors (``keep_last_round``).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._prev: np.ndarray | None = None

    def on_start(self, run: Any) -> None:
        cfg: Config = run.cfg
        check_recordable(cfg)
        self.directory = self.directory or Path(run.output) / RECORD_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"strategy": cfg.strategy.name, "params": dict(cfg.strategy.params),
                "num_clients": run.shards.num_clients, "groups": list(run.shards.groups),
                "counts": [int(s["train"]) for s in run.shards.summary],
                "run_output": str(Path(run.output).resolve())}
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=1))
        keep = getattr(run.server, "keep_last_round", None)
        if keep is not None:  # the server then keeps each round's task vectors for us
            import ray

            ray.get(keep.remote(True))

    def on_round(self, run: Any, row: dict[str, Any], report: dict[str, Any]) -> None:
        from safetensors.numpy import save_file

        assert self.directory is not None, "on_start was not called"
        rnd = int(row["round"])
        if getattr(run, "checkpoints", None) is not None:
            run.checkpoints.wait()  # this round's checkpoint is written in the background
        after, init, layout = _checkpoint_states(Path(run.output), rnd)
        if self._prev is None:
            self._prev = (np.tile(init, (after.shape[0], 1)) if rnd == 1
                          else _checkpoint_states(Path(run.output), rnd - 1)[0])
        before, self._prev = self._prev, after.copy()
        if rnd == 1 or not (self.directory / "layout.json").exists():
            (self.directory / "layout.json").write_text(json.dumps(layout))
            save_file({"init": np.ascontiguousarray(init)},
                      str(self.directory / "init.safetensors"))
        ids = [int(c) for c in report.accepted]
        weights = _round_weights(run, rnd, report)
        if not ids or weights is None or not report.aggregated:
            return
        idx = np.asarray(ids, dtype=np.int64)
        deltas = _exported_deltas(run.server, rnd, ids)
        if deltas is None and any(m != 1.0 for m in report.gate.values()):
            raise ConfigError(f"round {rnd}: cannot recover task vectors from checkpoints "
                              "after the "
                              "validation gate moved some states; record with "
                              "strategy.params.gate=[]")
        if deltas is None:
            try:
                deltas = recover_deltas(before[idx], after[idx], weights)
            except ValueError as exc:
                raise ConfigError(
                    f"round {rnd}: cannot record task vectors: {exc} (e.g. identical weight rows "
                    "under self_similarity 'max-peer'); record with --set strategy.name=local "
                    "or strategy.params.self_similarity=one") from None
        save_file({"clients": idx, "deltas": deltas,
                   "weights": weights},
                  str(self.directory / f"round_{rnd:05d}.safetensors"))

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        pass


def _round_weights(run: Any, rnd: int, report: Any) -> np.ndarray | None:
    """(N_t, N_t) float64 weights of round ``rnd``: the report's, or (many participants) the
    server's ``similarity/round_XXXXX.npz`` at the run's output; None without any."""
    if report.weights is not None:
        return np.asarray(report.weights, dtype=np.float64)
    summary, outputs = getattr(report, "summary", None), getattr(run, "outputs", None)
    if summary is None or summary.file is None or outputs is None:
        return None
    from fedbip_ray.runtime.outputs import read_round_matrices

    return read_round_matrices(outputs.location, rnd).weights.astype(np.float64)


@dataclass(frozen=True)
class Recording:
    """A recorded run: its output dir, config, and per-round (round, clients, deltas)."""

    run_dir: Path
    cfg: Config
    meta: dict[str, Any]
    layout: Layout
    init: np.ndarray
    rounds: tuple[tuple[int, np.ndarray, np.ndarray], ...]


def load_recording(run_dir: str | Path) -> Recording:
    """Read ``RUN/config.yaml`` and ``RUN/replay/`` (ConfigError if absent)."""
    from safetensors.numpy import load_file

    run = Path(run_dir)
    rec = run / RECORD_DIR
    if not (rec / "meta.json").is_file() or not (rec / "init.safetensors").is_file():
        raise ConfigError(f"--recording {run}: no recorded task vectors ({rec}/meta.json missing)")
    cfg = load_config(run / "config.yaml")
    rounds = []
    for path in sorted(rec.glob("round_*.safetensors")):
        t = load_file(str(path))
        rounds.append((int(path.stem.split("_")[1]), t["clients"], t["deltas"]))
    if not rounds:
        raise ConfigError(f"--recording {run}: no rounds recorded")
    return Recording(run, cfg, json.loads((rec / "meta.json").read_text()),
                     Layout.from_dict(json.loads((rec / "layout.json").read_text())),
                     load_file(str(rec / "init.safetensors"))["init"], tuple(rounds))
