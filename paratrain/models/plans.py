"""How a model is split, as data: a tensor-parallel *plan* and a pipeline *stage spec*.

Neither holds distributed code; ``paratrain.parallel`` reads them (``parallel/tp_plan.py`` applies
a plan, ``parallel/pipeline/stage.py`` cuts stages by a spec). Any ``nn.Module`` can be given
one; the built-in GPT's are below, the Hugging Face ones in ``models/hf.py``.

A **tensor-parallel plan** maps module-name patterns (``fnmatch``: ``blocks.*.attn.qkv``) to
styles. Every pattern must match at least one module. Styles (``n`` = tp):

=================  ==========================================================================
``column``         linear ``Y = X W^T``, output features split: rank r computes ``Y_r``, (.., out/n).
                   Its input enters the tp region (f, or the all-gather along the sequence
                   under SP) unless the module lies inside a ``tp_input`` module.
``row``            linear, input features split; the partial products summed (g, or the
                   reduce-scatter along the sequence under SP); the bias added once after.
``vocab_embedding`` token embedding, vocabulary rows split (padded when n does not divide V).
``vocab_head``     the LM head: ``column`` over the same padded vocabulary (tied: the
                   embedding's own shard), logits stay split, (.., V'/n).
``vocab_loss``     the loss module, ``(logits, targets) -> mean loss``: vocab-parallel
                   cross-entropy on the split logits.
``tp_input``       a module (attention, MLP) whose first input enters the tp region once for
                   all the column linears inside it; it then sees the whole sequence.
``sp_norm``        a norm on the residual stream: under sequence parallelism it normalises this
                   rank's tokens only, so its parameters' gradients are summed over tp.
``sp_positions``   a position embedding added to the residual stream: under SP it returns
                   this rank's positions.
``adjust``         ``fn(module, tp)`` runs after the split: a module whose attributes hold
                   widths the split changed (Hugging Face GPT-2's attention ``split_size``).
=================  ==========================================================================

A :class:`TPStyle` adds what the divisibility check needs: ``chunks`` (a fused ``[q; k; v]``
output: each part split separately, so every rank keeps its q, k and v heads together), and
``unit`` / ``what`` (the split must keep groups of ``unit`` features together: heads of
``head_dim``; ``what`` names them in the error). Both linear layouts are accepted: ``nn.Linear``
(weight (out, in)) and the transposed ``Conv1D`` of Hugging Face GPT-2 (weight (in, out)).

A **stage spec** (:class:`Stages`) names the model's list of blocks and the modules that run
before (embedding) and after (final norm, head, loss) them, and says how to run each part; its
:meth:`Stages.loss` is the whole forward, ``embed -> blocks -> head``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from paratrain.models.configs import ModelConfig

STYLES = ("column", "row", "vocab_embedding", "vocab_head", "vocab_loss", "tp_input", "sp_norm", "sp_positions",
          "adjust")


@dataclass(frozen=True)
class TPStyle:
    """One style of :data:`STYLES`; ``chunks``, ``unit``, ``what``: see the module doc."""

    kind: str
    chunks: int = 1
    unit: int = 1
    what: str = "features"
    fn: Callable[[nn.Module, int], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STYLES:
            raise ValueError(f"unknown tensor-parallel style {self.kind!r}; valid: {', '.join(STYLES)}")
        if (self.kind == "adjust") != (self.fn is not None):
            raise ValueError("a TPStyle has fn exactly when its kind is 'adjust'")


TPPlan = Mapping[str, "str | TPStyle"]


def style_of(value: str | TPStyle) -> TPStyle:
    return value if isinstance(value, TPStyle) else TPStyle(value)


def _call_block(model: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


@dataclass(frozen=True)
class Stages:
    """A model as ``embed -> blocks -> head``. ``blocks``: the dotted name of its
    ``nn.ModuleList``; ``before`` / ``after``: the modules (dotted names) that hold what
    ``embed(model, idx)`` (B, T) -> (B, T, H) and ``head(model, x, targets)`` -> mean loss use
    (the first and the last stage keep them); ``run_block(model, block, x)`` -> x runs one block;
    ``hidden``: H, the width sent between stages; ``config``: the shape the partition prices
    (None: blocks split evenly)."""

    blocks: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]
    hidden: int
    run_block: Callable[[nn.Module, nn.Module, torch.Tensor], torch.Tensor] = _call_block
    config: ModelConfig | None = None

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        try:
            blocks = model.get_submodule(self.blocks)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"the stage spec names {self.blocks!r} as the model's list of blocks, but the "
                             f"model has no nn.ModuleList of that name; its module lists: "
                             f"{', '.join(_module_lists(model)) or 'none'}")
        return blocks

    def loss(self, model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The whole forward: (B, T) ids -> mean loss against ``targets`` (logits without)."""
        x = self.embed(model, idx)
        for block in self.block_list(model):
            x = self.run_block(model, block, x)
        return self.head(model, x, targets)

    def unit_of_key(self, key: str, num_layers: int) -> int:
        """The unit (0 = before, 1..L = blocks, L + 1 = after) a state-dict entry belongs to."""
        if key.startswith(self.blocks + "."):
            return int(key[len(self.blocks) + 1:].split(".")[0]) + 1
        if any(key == m or key.startswith(m + ".") for m in self.before):
            return 0
        if any(key == m or key.startswith(m + ".") for m in self.after):
            return num_layers + 1
        raise ValueError(f"state-dict entry {key!r} is in no pipeline unit: neither in the blocks "
                         f"{self.blocks!r} nor in the modules before ({', '.join(self.before)}) or after "
                         f"({', '.join(self.after)}) them; name its module in `before` or `after`")


def _module_lists(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]


class StagedForward(nn.Module):
    """``forward(idx, targets)`` = ``stages.loss(model, idx, targets)``: a model without a loss
    forward of its own (a Hugging Face one) as the training step calls it. ``model`` is *not*
    registered as a child, so the parameter names stay the model's own; hooks on this module
    (ZeRO-3's gathering of the parts outside the blocks) run around the whole forward."""

    def __init__(self, model: nn.Module, stages: Stages) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        self.stages = stages

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.stages.loss(self.model, idx, targets)


# The built-in GPT (models/gpt.py). Its attention derives the number of heads from the width qkv
# returns, so no attribute needs adjusting after the split.
def gpt_tp_plan(cfg: ModelConfig) -> dict[str, str | TPStyle]:
    heads = TPStyle("column", chunks=3, unit=cfg.head_dim, what="attention heads")
    # a mixture of experts keeps its router and experts whole on every tp rank (docs/expert.md)
    dense = cfg.num_moe_blocks < cfg.num_layers
    return {
        "wte": "vocab_embedding", "wpe": "sp_positions", "lm_head": "vocab_head", "criterion": "vocab_loss",
        "blocks.*.attn.qkv": heads, "blocks.*.attn.proj": TPStyle("row", unit=cfg.head_dim, what="attention heads"),
        **({"blocks.*.mlp.fc1": "column", "blocks.*.mlp.fc2": "row"} if dense else {}),
        "blocks.*.ln1": "sp_norm", "blocks.*.ln2": "sp_norm", "ln_f": "sp_norm",
    }


def gpt_stages(cfg: ModelConfig) -> Stages:
    return Stages(blocks="blocks", before=("wte", "wpe"), after=("ln_f", "lm_head"),
                  embed=lambda m, idx: m.embed(idx), head=lambda m, x, t: m.head(x, t),
                  hidden=cfg.hidden, config=cfg)
