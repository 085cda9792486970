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
    dp, pp, tp, cp = layout.dp, layout.pp, layout.tp, layout.cp
    cols = cp * tp  # a data-parallel replica's columns: its cp ranks, each a tp group
    w, h, gap = 3.2, 1.9, 0.5
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + dp * (cols * w + gap)), 1.6 + pp * (h + gap)), dpi=110)
    stage_colors = plt.get_cmap("Pastel1")
    for v in views:
        x = v.dp * (cols * w + gap) + (v.cp * tp + v.tp) * w
        y = (pp - 1 - v.pp) * (h + gap)
        ax.add_patch(FancyBboxPatch((x + 0.08, y + 0.08), w - 0.16, h - 0.16, boxstyle="round,pad=0.02",
                                    fc=stage_colors(v.pp % 9), ec="black", lw=0.8))
        sent: dict[str, float] = {}
        for snd in v.sends:
            sent[snd.group] = sent.get(snd.group, 0.0) + snd.wire
        where = [f"dp {v.dp}", *([f"ep {v.ep}"] if layout.ep > 1 else []), f"pp {v.pp}",
                 *([f"cp {v.cp}"] if cp > 1 else []), f"tp {v.tp}"]
        text = [f"rank {v.rank}  ({', '.join(where)})", "; ".join(v.units), f"{v.params:,} params"]
        text += [f"{g} sends {human(b)}" for g, b in sent.items() if b]
        ax.text(x + w / 2, y + h / 2, "\n".join(text), ha="center", va="center", fontsize=7)
    for d in range(dp):  # a frame around each tp group
        for c in range(cp):
            for s in range(pp):
                x, y = d * (cols * w + gap) + c * tp * w, (pp - 1 - s) * (h + gap)
                ax.add_patch(Rectangle((x, y), tp * w, h, fill=False, ec=GROUP_COLORS["tp"], lw=1.5, ls="--"))
    ax.set_xlim(-0.2, dp * (cols * w + gap))
    ax.set_ylim(-0.2, pp * (h + gap))
    ax.axis("off")
    ax.set_title(f"{model.name} [{layout}]: rows = pipeline stages, dashed red = a tp group"
                 f"{' (cp ranks side by side)' if cp > 1 else ''}; "
                 f"bytes sent per step (fp32, ring algorithms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
