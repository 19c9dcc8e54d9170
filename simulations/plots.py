"""PNG plots of a federated run: training loss per round, and bytes per client per round."""

from __future__ import annotations

import os
from pathlib import Path

from fedhydra.common.files import atomic_path
from fedhydra.common.protocol import MODULES


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically."""
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_rounds(rounds: list[dict], out: str | os.PathLike, title: str) -> list[Path]:
    """rounds: federated.json's "rounds"; writes rounds-loss.png and rounds-bytes.png into `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    out = Path(out)
    xs = [r["round"] for r in rounds]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for module, marker in zip(MODULES, "os"):
        pts = [(r["round"], r["loss"]) for r in rounds if r["module"] == module and r["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=f"{module} train loss")
    ax.set_xlabel("round")
    ax.set_ylabel("mean client training loss")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:  # a DP run's clients send no training loss
        ax.text(0.5, 0.5, "no per-client loss leaves a DP client", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, out / "rounds-loss.png")
    plt.close(fig)
    paths.append(out / "rounds-loss.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    up = [sum(b["up"] for b in r["bytes"].values()) / max(1, len(r["bytes"])) / 1e6 for r in rounds]
    down = [sum(b["down"] for b in r["bytes"].values()) / max(1, len(r["bytes"])) / 1e6 for r in rounds]
    ax.bar([x - 0.2 for x in xs], down, width=0.4, label="down (server to client)")
    ax.bar([x + 0.2 for x in xs], up, width=0.4, label="up (client to server)")
    ax.set_xlabel("round")
    ax.set_ylabel("MB per client")
    ax.set_title(title)
    ax.legend()
    save_figure(fig, out / "rounds-bytes.png")
    plt.close(fig)
    paths.append(out / "rounds-bytes.png")
    return paths
