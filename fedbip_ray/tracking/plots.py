"""PNG figures logged with a run: annotated matrix heatmaps and accuracy per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def heatmap_png(matrix: np.ndarray, labels: list[int], title: str, path: Path) -> None:
    """Write an (N, N) matrix as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.4 * n))
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


def accuracy_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Mean / worst-10% / per-client test accuracy per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("mean_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        rounds = [r["round"] for r in rows]
        for cid in rows[-1]["per_client_accuracy"]:
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
