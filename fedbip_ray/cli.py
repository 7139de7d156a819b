"""The ``fedbip`` command: run, tune, replay, bench.

Exit codes: 0 success; 2 config or input error (one line on stderr); 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedbip_ray.config import Config, ConfigError, load_config
from fedbip_ray.config_io import RunFailed
from fedbip_ray.runtime.outputs import fetch_config, is_uri, local_side

EXAMPLES = """examples:
  fedbip run jobs/configs/quickstart.yaml
  fedbip run jobs/configs/quickstart.yaml --set strategy.name=fedavg --set federation.rounds=5
  fedbip run --resume runs/quickstart            # continue an interrupted run
  fedbip tune jobs/configs/tune.yaml
  fedbip replay jobs/configs/tune_tiny.yaml --record   # aggregation-only search, no retraining
  fedbip bench aggregation --quick
  fedbip join runs/quickstart --data new_users.csv --client-column user
  fedbip run --resume runs/qs --set 'data.joined=[runs/qs/joined]' --set federation.rounds=6
"""


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set strategy.params.threshold=0.1 "
                        "(repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbip", description="Personalized federated fine-tuning with FedBip on Ray.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation", description=(
        "Run a federation. Without RAY_ADDRESS an embedded local Ray is started; with it (or "
        "inside `ray job submit`) the run joins that cluster. Writes config.yaml, metrics.jsonl, "
        "summary.json and per-round checkpoints into the output directory."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(run, optional=True)
    run.add_argument("--output", help="output directory (default runs/<name>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its latest checkpoint (config from "
                          "DIR/config.yaml "
                          "unless CONFIG is given)")
    run.add_argument("--quiet", action="store_true", help="print only the final table")

    tune = sub.add_parser("tune", help="Ray Tune search over strategy and training parameters")
    _add_config_args(tune)
    tune.add_argument("--output", help="output directory (default runs/<name>-tune)")

    _add_replay_parser(sub)
    _add_join_parser(sub)

    bench = sub.add_parser("bench", help="run a benchmark (writes benchmarks/results/*.md)")
    bench.add_argument("name", choices=["aggregation", "accuracy", "performance", "instruct",
                                        "similarity_probe"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _add_replay_parser(sub: argparse._SubParsersAction) -> None:
    replay = sub.add_parser("replay", help="replay tuning: search aggregation parameters on "
                            "recorded task vectors (no client trains)", description=(
        "Search the aggregation-only parameters (tune.space: strategy.params.* only) of a tune "
        "config on the task vectors recorded from one run; the best candidate is tested once. "
        "Writes replay_summary.json and best_config.yaml into the output directory."))
    _add_config_args(replay)
    src = replay.add_mutually_exclusive_group(required=True)
    src.add_argument("--recording", help="run directory recorded for replay")
    src.add_argument("--record", action="store_true", help="record a run of the base config first")
    replay.add_argument("--record-set", dest="record_overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for the recorded run only, e.g. "
                        "strategy.params.self_similarity=one")
    replay.add_argument("--output", help="output directory (default runs/<name>-replay)")


def _add_join_parser(sub: argparse._SubParsersAction) -> None:
    join = sub.add_parser("join", help="give new clients a personalized adapter from a run",
                          description=(
        "Each newcomer in FILE fine-tunes the run's initial adapter on its own data, gets an "
        "aggregate of the stored clients most like it (the run's strategy), and the run's "
        "validation gate picks the mix. Writes adapters (peft format), weights, similarity "
        "rows and scores into the output directory (default RUN_DIR/joined). The run itself "
        "is not changed; `fedbip run --resume RUN_DIR --set data.joined=[DIR]` lets the "
        "newcomers take part in further rounds."))
    join.add_argument("run_dir", metavar="RUN_DIR",
                      help="output directory (or storage URI) of a finished run")
    join.add_argument("--data", required=True, metavar="FILE",
                      help="Parquet, CSV or JSON lines with the run's data columns (text and "
                           "label; generative runs: prompt/response or messages, task)")
    join.add_argument("--client-column", metavar="C",
                      help="one newcomer per value of this column (default: one newcomer)")
    join.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field of the run's config, e.g. resources.max_actors=1")
    join.add_argument("--output", metavar="DIR", help="output directory (default RUN_DIR/joined)")


def cmd_join(args: argparse.Namespace) -> int:
    """Join newcomers to a finished run; prints one line per newcomer."""
    from fedbip_ray.runtime.join import join_run

    results = join_run(args.run_dir, args.data, args.client_column, args.overrides, args.output,
                       echo=lambda s: print(s, flush=True))
    where = args.output or str(local_side(args.run_dir) / "joined")
    print(f"{len(results)} newcomer(s) joined: results in {where}/ (summary.json)", flush=True)
    return 0


def _configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("FEDBIP_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")


def cmd_run(args: argparse.Namespace) -> int:
    from fedbip_ray.runtime.federation import run_federation
    from fedbip_ray.runtime.progress import PhaseProgress
    from fedbip_ray.runtime.rows import format_client_table

    resume: str | None = args.resume
    if resume is not None and not is_uri(resume) and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: directory not found")
    config_path = args.config or (_resumed_config(resume) if resume else None)
    if config_path is None:
        raise ConfigError("run: give a CONFIG file (or --resume DIR)")
    cfg: Config = load_config(config_path, args.overrides)
    output: str = args.output or resume or str(Path("runs") / cfg.name)
    callbacks = []
    if cfg.tracking.mlflow:
        from fedbip_ray.tracking.mlflow_logger import MlflowCallback

        callbacks.append(MlflowCallback(cfg))
    echo = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    progress = None if args.quiet else PhaseProgress(cfg.federation.rounds)
    summary = run_federation(cfg, output, resume=resume is not None, callbacks=callbacks, echo=echo,
                             progress=progress)
    groups = [int(g) for g in _groups(local_side(output))]
    print(format_client_table(summary, groups), flush=True)
    print(f"results in {output.rstrip('/')}/ (summary.json, metrics.jsonl)", flush=True)
    for where in filter(None, (cb.where_to_look() for cb in callbacks)):
        print(where, flush=True)  # the MLflow run's URL (or local store)
    return 0


def _resumed_config(resume: str) -> str:
    """The resumed run's config.yaml: its path, or for a storage URI a local copy."""
    if not is_uri(resume):
        return str(Path(resume) / "config.yaml")
    copy = fetch_config(resume)
    if copy is None:
        raise ConfigError(f"--resume {resume}: no config.yaml there (give CONFIG too)")
    return str(copy)


def _groups(output: Path) -> list[int]:
    from fedbip_ray.data.shards import ShardSet

    return list(ShardSet.load(output / "shards").groups)


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune search: progress table while it runs, then the best config and its test score."""
    from fedbip_ray.tuning.search import format_summary, run_tune

    summary = run_tune(args.config, args.overrides, args.output)
    print(format_summary(summary), flush=True)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay search on a recording (or record one first); prints the best candidate."""
    from fedbip_ray.tuning.replay import format_summary, run_replay

    summary = run_replay(args.config, args.overrides, args.recording, args.output, args.record,
                         args.record_overrides)
    print(format_summary(summary), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    root = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not root.is_file():
        raise ConfigError(f"bench {args.name}: {root} not found (run from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"fedbip_bench_{args.name}", root)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the module look themselves up here
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "tune": cmd_tune, "replay": cmd_replay, "bench": cmd_bench,
                "join": cmd_join}
    try:
        return handlers[args.command](args)
    except ConfigError as err:
        print(f"fedbip: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedbip: run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedbip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
