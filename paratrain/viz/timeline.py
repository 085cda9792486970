"""Pipeline timelines: one row per pipeline rank, a box per forward / backward, idle time blank.

Draws the plain-data form of a timeline (``Timeline.to_json()``, the content of
``timeline.json``), so a simulated schedule (``paratrain schedule``) and a measured step
(``paratrain train``) are drawn by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLORS = {"F": ("#9ecae1", "#3182bd"), "B": ("#fdae6b", "#e6550d"),  # (light, dark) per kind
          "I": ("#fdae6b", "#e6550d"), "W": ("#a1d99b", "#31a354")}  # I/W: the split backward


def _color(kind: str, chunk: int, num_chunks: int) -> str:
    light, dark = COLORS[kind]
    return dark if num_chunks > 1 and chunk % 2 else light


def plot_timeline(data: dict[str, Any], path: Path | str, title: str = "", unit: str = "") -> Path:
    """Draw ``data`` (see module doc) to a PNG at ``path``. Boxes are labelled with the
    micro-batch (``m.c`` for chunk ``c`` when there are several chunks per rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = data["ranks"]
    v = data.get("virtual_stages", 1)
    span = max((a["end"] for row in ranks for a in row), default=1.0) or 1.0
    boxes = [a for row in ranks for a in row if a["kind"] in COLORS]
    narrowest = min((a["end"] - a["start"] for a in boxes if a["end"] > a["start"]), default=span)
    width_in = min(24.0, max(8.0, 0.3 * span / narrowest + 2))  # about 0.3 inch per narrowest box
    fig, ax = plt.subplots(figsize=(width_in, 0.55 * len(ranks) + 1.6), dpi=110)
    for r, row in enumerate(ranks):
        for a in row:
            if a["kind"] not in COLORS:
                continue
            width = a["end"] - a["start"]
            ax.barh(r, width, left=a["start"], height=0.8, color=_color(a["kind"], a["chunk"], v),
                    edgecolor="black", linewidth=0.4)
            label = f"{a['microbatch']}.{a['chunk']}" if v > 1 else str(a["microbatch"])
            if width / span * 0.85 * width_in > 0.07 * len(label) + 0.04:  # the label fits
                ax.text(a["start"] + width / 2, r, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in range(len(ranks))])
    ax.invert_yaxis()
    ax.set_xlim(0, span)
    ax.set_xlabel(f"time ({unit})" if unit else "time")
    handles = [Patch(facecolor=COLORS["F"][0], edgecolor="black", label="forward"),
               Patch(facecolor=COLORS["B"][0], edgecolor="black", label="backward"),
               Patch(facecolor="white", edgecolor="black", label="idle")]
    if any(a["kind"] in "IW" for a in boxes):
        handles[1:2] = [Patch(facecolor=COLORS["I"][0], edgecolor="black", label="input gradient (I)"),
                        Patch(facecolor=COLORS["W"][0], edgecolor="black", label="weight gradient (W)")]
    if v > 1:
        handles[-1:-1] = [Patch(facecolor=COLORS["F"][1], edgecolor="black", label="forward, odd chunk"),
                          Patch(facecolor=COLORS["B"][1], edgecolor="black", label="backward (I), odd chunk")]
        if any(a["kind"] == "W" for a in boxes):
            handles[-1:-1] = [Patch(facecolor=COLORS["W"][1], edgecolor="black", label="W, odd chunk")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(ranks) < 4 else -0.2),
              ncol=len(handles), fontsize=8, frameon=False)
    ax.set_title(title or f"{data.get('schedule', '')} schedule, bubble {data.get('bubble', 0):.1%}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_timeline(data: dict[str, Any], folder: Path | str, title: str = "", unit: str = "s") -> None:
    """Write ``timeline.json`` and ``timeline.png`` into ``folder``."""
    folder = Path(folder)
    (folder / "timeline.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    plot_timeline(data, folder / "timeline.png", title, unit)
