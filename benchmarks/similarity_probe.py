"""Which task-vector similarity tells similar clients from conflicting ones?

Trains every client locally (no federation) for a few rounds in one process, records the
per-round task vectors and the cumulative ones, and scores each similarity definition by how
well it recovers the true client groups: mean in-group vs cross-group cosine (separation),
adjusted Rand index of a clustering, and the in-group share of the resulting FedBip weights.

    python benchmarks/similarity_probe.py [--config jobs/configs/quickstart.yaml] [--set k=v ...]
        [--rounds 4] [--out benchmarks/results/similarity_probe.md]
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench_parser, command_line  # noqa: E402
from fedbip_ray.config import load_config  # noqa: E402
from fedbip_ray.core.grouping import group_recovery  # noqa: E402
from fedbip_ray.core.similarity import similarity_matrix  # noqa: E402
from fedbip_ray.core.weights import personalized_weights  # noqa: E402
from fedbip_ray.data.shards import build_shards, read_shard  # noqa: E402
from fedbip_ray.training.registry import make_trainer  # noqa: E402
from fedbip_ray.training.seeds import seed_for  # noqa: E402

# (label, reference, options for similarity_matrix)
OPTIONS: list[tuple[str, str, dict]] = [
    ("per-round, flat (paper)", "round", {}),
    ("per-round, flat, centered", "round", {"center": True}),
    ("per-round, layer-normalized", "round", {"scope": "layer"}),
    ("per-round, head only", "round", {"scope": "modules", "modules": ("classifier",)}),
    ("per-round, LoRA as B@A", "round", {"lora_product": True}),
    ("cumulative, flat", "pretrained", {}),
    ("cumulative, flat, centered", "pretrained", {"center": True}),
    ("cumulative, layer-normalized", "pretrained", {"scope": "layer"}),
    ("cumulative, layer-normalized, centered", "pretrained", {"scope": "layer", "center": True}),
    ("cumulative, head only", "pretrained", {"scope": "modules", "modules": ("classifier",)}),
    ("cumulative, head only, centered", "pretrained",
     {"scope": "modules", "modules": ("classifier",), "center": True}),
    ("cumulative, LoRA as B@A", "pretrained", {"lora_product": True}),
    ("cumulative, LoRA as B@A, centered", "pretrained", {"lora_product": True, "center": True}),
]


def train_locally(cfg: Any, rounds: int, workdir: Path
                  ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, object]:
    """Per-round deltas and parameters after each round, (N, D) each; groups; layout."""
    shards = build_shards(cfg.data, cfg.seed, workdir / "shards")
    trainer = make_trainer(cfg, shards.num_labels)
    init = trainer.initial_state()
    data = [trainer.encode(read_shard(p)["train"]) for p in shards.paths]
    states = np.tile(init, (shards.num_clients, 1))
    deltas_per_round, thetas_per_round = [], []
    for r in range(1, rounds + 1):
        deltas = np.zeros_like(states)
        for c in range(shards.num_clients):
            trainer.load_state(states[c])
            trainer.train(data[c], cfg.train.local_epochs, seed_for(cfg.seed, c, r))
            deltas[c] = trainer.current_state() - states[c]
        states = states + deltas
        deltas_per_round.append(deltas)
        thetas_per_round.append(states.copy())
        print(f"  round {r}: trained {shards.num_clients} clients", flush=True)
    return deltas_per_round, thetas_per_round, np.asarray(shards.groups), (trainer.layout, init)


def score(deltas, thetas, groups, layout, init) -> list[dict]:
    """Group recovery of every option at every round."""
    rows = []
    for label, ref, opts in OPTIONS:
        per_round = []
        for r in range(len(deltas)):
            if ref == "round":
                if opts.get("lora_product"):
                    prev = thetas[r - 1] if r else np.tile(init, (len(groups), 1))
                    s = similarity_matrix(thetas[r], layout, base=prev, **opts)
                else:
                    s = similarity_matrix(deltas[r], layout, **opts)
            else:
                s = similarity_matrix(thetas[r], layout, base=init, **opts)
            w = personalized_weights(s, clip_negative=True)
            per_round.append(group_recovery(s, w, groups))
        rows.append({"option": label, "rounds": per_round})
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    """The report: one table row per similarity option, at the last round."""
    n = len(rows[0]["rounds"])
    lines = [header, "",
             "| similarity | in-group | cross-group | separation (last) | ARI per round "
             "| in-group weight share per round |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        last = row["rounds"][-1]
        sep = last["in_group_similarity"] - last["cross_group_similarity"]
        ari = " / ".join(f"{r['adjusted_rand_index']:.2f}" for r in row["rounds"])
        share = " / ".join(f"{r['in_group_weight_share']:.2f}" for r in row["rounds"])
        lines.append(f"| {row['option']} | {last['in_group_similarity']:+.3f} | "
                     f"{last['cross_group_similarity']:+.3f} | {sep:+.3f} | {ari} | {share} |")
    lines.append("")
    lines.append(f"Rounds: {n}. Weights: FedBip with negatives clipped. An ideal similarity gives "
                 "ARI 1 and an in-group weight share of 1.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train, score every option, print the report and write it to ``--out``."""
    ap = bench_parser(__doc__)
    ap.add_argument("--config", default="jobs/configs/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--workdir", default="/tmp/fedbip_probe")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    deltas, thetas, groups, (layout, init) = train_locally(cfg, args.rounds, Path(args.workdir))
    rows = score(deltas, thetas, groups, layout, init)
    cmd = command_line("similarity_probe.py", argv)
    header = (f"# Similarity probe: group recovery by task-vector definition\n\n"
              f"Command: `{cmd}`  \nSetting: model `{cfg.model.name}`, "
              f"dataset `{cfg.data.dataset}`, "
              f"{cfg.data.num_clients} clients, partition `{cfg.data.partition.kind}` "
              f"({cfg.data.partition.num_groups} groups, shift `{cfg.data.partition.shift}`), "
              f"{cfg.train.local_epochs} local epochs, lr {cfg.train.lr}, "
              f"optimizer {cfg.train.optimizer}; local training only. "
              f"Machine: {platform.machine()}, {platform.python_version()}; "
              f"{time.perf_counter() - t0:.0f} s.")
    md = to_markdown(rows, header)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
