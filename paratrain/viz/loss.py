"""Loss curves from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(records: list[dict[str, Any]], path: Path | str, title: str = "",
              resumed_at: list[int] | None = None) -> Path:
    """Training loss per step (and validation loss where measured) to a PNG; a dashed line after
    each step in ``resumed_at`` (where the run was resumed from a checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in records], lw=1.2, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", ms=4, lw=1.2, label="validation loss")
    for i, step in enumerate(resumed_at or []):
        ax.axvline(step + 0.5, color="grey", ls="--", lw=1, label="resumed from a checkpoint" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
