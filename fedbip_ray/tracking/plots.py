"""PNG figures logged with a run: matrix heatmaps (block views beyond 64 clients), per-client
accuracy histograms and accuracy per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_ray.core.matrix_view import block_mean, cluster_order
from fedbip_ray.runtime.messages import FULL_MATRIX_MAX

VIEW_FIGSIZE = (8.0, 7.0)  # inches, for every block view whatever the number of clients
MAX_TICKS = 16
MAX_CLIENT_LINES = 100  # per-client lines drawn in the accuracy plot


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_png(matrix: np.ndarray, labels: list[int], title: str, path: Path,
                groups: np.ndarray | None = None) -> None:
    """Write an (N, N) matrix as a heatmap PNG: every cell (annotated up to 16 clients) for
    N <= ``FULL_MATRIX_MAX``; beyond, clients sorted by ``groups`` (N,) when known, else by
    a clustering order of ``matrix``, averaged into at most 64 x 64 blocks."""
    n = len(labels)
    if n > FULL_MATRIX_MAX:
        order = (np.argsort(np.asarray(groups), kind="stable") if groups is not None
                 else cluster_order(matrix))
        cells = block_mean(np.asarray(matrix)[np.ix_(order, order)])
        starts = np.linspace(0, n, len(cells) + 1).astype(np.int64)[:-1]
        names = ([f"g{int(np.asarray(groups)[order[i]])}" for i in starts] if groups is not None
                 else [f"#{int(i)}" for i in starts])
        block_heatmap_png(cells, names, f"{title} ({n} clients, block means)", path)
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(12.0, 1.0 + 0.45 * n), min(11.0, 0.8 + 0.4 * n)))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(n), [str(c) for c in labels], fontsize=7)
    ax.set_yticks(range(n), [str(c) for c in labels], fontsize=7)
    ax.set_xlabel("client k")
    ax.set_ylabel("client i")
    ax.set_title(title, fontsize=9)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def block_heatmap_png(cells: np.ndarray, labels: Sequence[str], title: str, path: Path) -> None:
    """Write a (C, C) block view (C <= 64 cells, ``labels`` (C,)) as a PNG of fixed size."""
    plt = _pyplot()
    c = len(labels)
    step = max(1, -(-c // MAX_TICKS))
    ticks = list(range(0, c, step))
    fig, ax = plt.subplots(figsize=VIEW_FIGSIZE)
    im = ax.imshow(np.asarray(cells, dtype=np.float64), cmap="viridis", interpolation="nearest")
    ax.set_xticks(ticks, [labels[i] for i in ticks], fontsize=7, rotation=90)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
    ax.set_xlabel("clients k (blocks)")
    ax.set_ylabel("clients i (blocks)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histogram_png(values: Sequence[float], title: str, path: Path) -> None:
    """Write a histogram of ``values`` (e.g. per-client accuracy) as a PNG of fixed size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.asarray(values, dtype=np.float64), bins=min(50, max(5, len(values) // 10)))
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("clients")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Mean / worst-10% / per-client (the first 100 clients) test accuracy per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("mean_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        rounds = [r["round"] for r in rows]
        for cid in list(rows[-1]["per_client_accuracy"])[:MAX_CLIENT_LINES]:
            ax.plot(rounds, [r["per_client_accuracy"].get(cid) for r in rows], color="0.8",
                    lw=0.8)
        ax.plot(rounds, [r["mean_accuracy"] for r in rows], label="mean", lw=2)
        ax.plot(rounds, [r["worst10_accuracy"] for r in rows], label="worst 10%", lw=2)
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
