"""The picture of ``paratrain explain --out``: one box per rank, pipeline stages as rows, the
data-parallel replicas side by side and their tensor-parallel ranks adjacent inside a frame; each
box names the rank's coordinates, layers, parameters and bytes sent per step. No torch."""

from __future__ import annotations

from pathlib import Path

from paratrain.config import Layout
from paratrain.models.configs import ModelConfig
from paratrain.plan.explain import human, rank_views

GROUP_COLORS = {"dp": "tab:blue", "tp": "tab:red", "pp": "tab:green", "embedding": "tab:purple"}


def draw_layout(model: ModelConfig, layout: Layout, global_batch: int, seq_len: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    views = rank_views(model, layout, global_batch, seq_len)
    dp, pp, tp = layout.dp, layout.pp, layout.tp
    w, h, gap = 3.2, 1.9, 0.5
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + dp * (tp * w + gap)), 1.6 + pp * (h + gap)), dpi=110)
    stage_colors = plt.get_cmap("Pastel1")
    for v in views:
        x = v.dp * (tp * w + gap) + v.tp * w
        y = (pp - 1 - v.pp) * (h + gap)
        ax.add_patch(FancyBboxPatch((x + 0.08, y + 0.08), w - 0.16, h - 0.16, boxstyle="round,pad=0.02",
                                    fc=stage_colors(v.pp % 9), ec="black", lw=0.8))
        sent = {g: sum(s.wire for s in v.sends if s.group == g) for g in GROUP_COLORS}
        text = [f"rank {v.rank}  (dp {v.dp}, pp {v.pp}, tp {v.tp})", "; ".join(v.units), f"{v.params:,} params"]
        text += [f"{g} sends {human(b)}" for g, b in sent.items() if b]
        ax.text(x + w / 2, y + h / 2, "\n".join(text), ha="center", va="center", fontsize=7)
    for d in range(dp):  # a frame around each data-parallel replica's tp groups
        for s in range(pp):
            x, y = d * (tp * w + gap), (pp - 1 - s) * (h + gap)
            ax.add_patch(Rectangle((x, y), tp * w, h, fill=False, ec=GROUP_COLORS["tp"], lw=1.5, ls="--"))
    ax.set_xlim(-0.2, dp * (tp * w + gap))
    ax.set_ylim(-0.2, pp * (h + gap))
    ax.axis("off")
    ax.set_title(f"{model.name} [{layout}]: rows = pipeline stages, dashed red = a tp group; "
                 f"bytes sent per step (fp32, ring algorithms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
