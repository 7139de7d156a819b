"""Replay tuning: search aggregation-only parameters on a recorded run's task vectors.

Aggregation parameters (``threshold``, ``temperature``, ``top_k``, ``clip_negative``, ...) act
only on the server. A run recorded with :class:`TaskVectorRecorder` keeps, per round, every
participant's task vector τᵢᵗ; :func:`replay_states` then re-runs the *server* for a candidate
parameter set (the same :class:`FederatedServer` code, on the recorded τ) and the client actors
score the resulting personalized states on their validation splits. No client trains.

What it is, honestly: an open-loop approximation. Round 1 is exact (every τ¹ starts from the
same init, whatever the parameters); from round 2 on, a real run's clients would have trained
from the candidate's states, not the recording's, so replay ranks candidates by what their
aggregation does to the *recorded* trajectory. Its cost is one recorded run plus, per
candidate, one aggregation per round and one validation pass per client. The validation gate
(``gate``, a client-side step after aggregation) is not replayed: candidates are compared on
their aggregation alone.

How a run is recorded, and why only ``fedbip``, ``fedbip-paper`` and ``local`` runs with an
invertible weight matrix and without DP noise can be, is in :mod:`.recording`.

    fedbip replay TUNE.yaml --record --record-set strategy.params.self_similarity=one
    fedbip replay TUNE.yaml --recording runs/rec  # replay an earlier one

(``python -m fedbip_ray.tuning.replay ARGS`` is the same as ``fedbip replay ARGS``.)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_ray.config import Config, ConfigError, config_from_dict
from fedbip_ray.config_io import apply_overrides, dump_config
from fedbip_ray.core.strategies import Strategy, make_strategy
from fedbip_ray.tuning.recording import (
    Recording,
    TaskVectorRecorder,
    check_recordable,
    load_recording,
)
from fedbip_ray.tuning.space import (
    TuneSettings,
    apply_params,
    load_tune_config,
    plain,
    sample_space,
    set_dotted,
)

log = logging.getLogger("fedbip.replay")

#: Strategies a replay can score (their server step is a function of the recorded tau only).
REPLAYABLE = ("fedbip", "fedbip-paper", "fedbip-layer", "local")


# ---------------------------------------------------------------------------------- replay
def replay_states(rec: Recording, strategy: str, params: Mapping[str, Any],
                  upto: int | None = None) -> np.ndarray:
    """:func:`replay_strategy` of strategy ``strategy`` built from raw ``params``."""
    return replay_strategy(rec, make_strategy(strategy, params), upto)


def replay_strategy(rec: Recording, strategy: Strategy, upto: int | None = None) -> np.ndarray:
    """Personalized states ``(N, D)`` float32 after replaying the recorded task vectors through
    the server with ``strategy`` (rounds ``<= upto``, default all)."""
    from fedbip_ray.runtime.messages import ClientUpdate, ServerSettings
    from fedbip_ray.runtime.server import FederatedServer

    server = FederatedServer(ServerSettings(strategy, int(rec.meta["num_clients"]),
                                            tuple(int(g) for g in rec.meta["groups"])))
    server.initialize(rec.init, rec.layout)
    counts = rec.meta["counts"]
    for rnd, clients, deltas in rec.rounds:
        if upto is not None and rnd > upto:
            break
        updates = [ClientUpdate(int(c), rnd, deltas[i], rec.layout, int(counts[int(c)]), {})
                   for i, c in enumerate(clients)]
        server.aggregate(rnd, updates)
    return server.all_states().copy()


# ---------------------------------------------------------------------------------- scoring
class ReplayEvaluator:
    """Client actors (the model loaded once each) that score personalized states on each
    client's own splits of the recorded run's shards."""

    def __init__(self, rec: Recording) -> None:
        import ray

        from fedbip_ray.data.shards import ShardSet
        from fedbip_ray.runtime.cluster import ensure_ray, plan_actors, spawn_client
        from fedbip_ray.runtime.messages import ShardRef

        ensure_ray()
        cfg = rec.cfg
        shards = ShardSet.load(rec.run_dir / "shards")
        num_actors = plan_actors(cfg, ray.cluster_resources())
        self.actors = [spawn_client(cfg, shards.num_labels) for _ in range(num_actors)]
        self.shards = {c: ShardRef(c, ray.put(path.read_bytes()))
                       for c, path in enumerate(shards.paths)}
        infos = ray.get([a.info.remote() for a in self.actors])
        errors = [i["error"] for i in infos if i.get("error")]
        if errors:
            raise ConfigError(errors[0])

    def evaluate(self, states: np.ndarray,
                 splits: tuple[str, ...] = ("val",)) -> dict[int, dict[str, float]]:
        """{client: {split: accuracy}} of each client's row of ``states`` ``(N, D)``."""
        import ray

        refs = {c: self.actors[c % len(self.actors)].evaluate.remote(
                    c, states[c], 0, splits, 0, self.shards[c]) for c in self.shards}
        return {c: {s: float(v["accuracy"]) for s, v in ray.get(r).splits.items()}
                for c, r in refs.items()}

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def score(evals: Mapping[int, Mapping[str, float]], metric: str, split: str = "val") -> float:
    """``mean_val_accuracy`` or ``worst10_val_accuracy`` (``split`` may be ``test``) of evals."""
    from fedbip_ray.runtime.rows import worst_fraction_mean

    vals = [float(e[split]) for e in evals.values() if e[split] == e[split]]
    if not vals:
        return float("nan")
    return float(np.mean(vals)) if metric.startswith("mean") else worst_fraction_mean(vals)


# ---------------------------------------------------------------------------------- driver
def check_replayable(cfg: Config, settings: TuneSettings) -> None:
    """Only server-side parameters can be replayed; ConfigError naming the first other key."""
    if cfg.strategy.name not in REPLAYABLE:
        raise ConfigError(f"strategy.name '{cfg.strategy.name}': replay scores "
                          f"{', '.join(REPLAYABLE)} only")
    for key in settings.space:
        if not key.startswith("strategy.params."):
            raise ConfigError(f"tune.space.'{key}': replay searches aggregation parameters "
                              "(strategy.params.*) only; use `fedbip tune` for the rest")


def check_same_setting(recorded: Config, current: Config) -> None:
    """The tune config must describe the recorded run's data, model, training and seed."""
    from fedbip_ray.runtime.checkpoint import config_difference

    diff = config_difference(recorded.to_dict(), current.to_dict(),
                             frozen=("seed", "model", "data", "train"))
    if diff is not None:
        raise ConfigError(f"--recording: the recorded run differs from the config ({diff})")


def record_run(cfg: Config, output: str | Path, echo: Any = print) -> dict[str, Any]:
    """Run a federation with :class:`TaskVectorRecorder` (and MLflow if enabled)."""
    from fedbip_ray.runtime.federation import run_federation
    from fedbip_ray.tracking.mlflow_logger import MlflowCallback

    check_recordable(cfg)  # before any actor starts
    callbacks: list[Any] = [TaskVectorRecorder()]
    if cfg.tracking.mlflow:
        callbacks.append(MlflowCallback(cfg, log_adapters=False))
    return run_federation(cfg, output, callbacks=callbacks, echo=echo)


def run_replay(config_path: str | Path, overrides: Sequence[str] = (),
               recording: str | Path | None = None,
               output: str | Path | None = None, record: bool = False,
               record_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Replay search: sample ``tune.num_samples`` candidates of the (aggregation-only) space,
    score each on the recording by validation, test the best once; write
    ``replay_summary.json`` and ``best_config.yaml`` into ``output``. With ``record``, first
    record a run of the base config plus ``record_overrides`` (e.g. strategy parameters that
    keep the weight matrix invertible)."""
    data, cfg, settings = load_tune_config(config_path, overrides)
    check_replayable(cfg, settings)
    out = Path(output or Path("runs") / f"{cfg.name}-replay")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if record:
        recording = out / "recording"
        rec_cfg = config_from_dict(apply_overrides(data, [f"name={cfg.name}-recording",
                                                          *record_overrides]))
        record_run(rec_cfg, recording, echo=log.info)
    if recording is None:
        raise ConfigError("replay: give --recording RUN_DIR (a run recorded for replay) "
                          "or --record")
    record_seconds = time.perf_counter() - t0
    rec = load_recording(recording)
    check_same_setting(rec.cfg, cfg)
    candidates = sample_space(settings.space, settings.num_samples, settings.seed)
    evaluator = ReplayEvaluator(rec)
    t1 = time.perf_counter()
    try:
        rows = []
        for params in candidates:
            cand = config_from_dict(apply_params(data, params))
            evals = evaluator.evaluate(replay_strategy(rec, cand.strategy.build()))
            rows.append({"params": {k: plain(v) for k, v in params.items()},
                         "last": {settings.metric: score(evals, settings.metric),
                                  "round": int(rec.rounds[-1][0])}})
        sign = 1.0 if settings.mode == "max" else -1.0
        best = max(rows, key=lambda r: sign * r["last"][settings.metric])
        best_cfg = config_from_dict(set_dotted(apply_params(data, best["params"]), "name",
                                               f"{cfg.name}-best"))
        test_evals = evaluator.evaluate(replay_strategy(rec, best_cfg.strategy.build()), ("test",))
    finally:
        evaluator.close()
    dump_config(best_cfg, out / "best_config.yaml")
    summary = {"metric": settings.metric, "mode": settings.mode, "recording": str(Path(recording)),
               "best": {"params": best["params"], "metric_value": best["last"][settings.metric],
                        "replay_test_mean_accuracy": score(test_evals, "mean", "test")},
               "candidates": rows, "best_config": str(out / "best_config.yaml"),
               "record_seconds": record_seconds if record else None,
               "replay_seconds": time.perf_counter() - t1}
    (out / "replay_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """Two lines for the terminal: the best candidate and where its config is."""
    best = summary["best"]
    return (f"best by replay: {best['params']}  {summary['metric']} {best['metric_value']:.4f}  "
            f"(replay test {best['replay_test_mean_accuracy']:.4f}; {len(summary['candidates'])} "
            f"candidates in {summary['replay_seconds']:.1f}s)\n"
            f"best config: {summary['best_config']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedbip_ray.tuning.replay ARGS``: the same as ``fedbip replay ARGS``."""
    from fedbip_ray.cli import main as cli_main

    return cli_main(["replay", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
