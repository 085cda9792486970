"""Tensor parallelism of any ``nn.Module`` by a plan: module-name patterns -> styles.

The styles and their math are listed in :mod:`paratrain.models.plans`; the layers that implement
them are :mod:`paratrain.parallel.tensor` (column, row, sequence-parallel positions) and
:mod:`paratrain.parallel.vocab` (vocab-parallel embedding and loss). :func:`check_tp_plan`
needs no process group: it resolves the patterns against the model's module names and checks
that tp divides every split width, so ``paratrain train`` rejects a bad plan before launch.
:func:`apply_tp_plan` replaces the matched modules in place by their sharded versions, sliced
from the reference weights (the built-in GPT goes through it too: ``tensor.tensor_parallel``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from paratrain.comm import Group
from paratrain.models.plans import TPPlan, TPStyle, style_of
from paratrain.parallel.shard import mark_partial_grad, shard_parameter
from paratrain.parallel.tensor import ColumnParallelLinear, RowParallelLinear, SequenceParallelPositions, is_conv1d
from paratrain.parallel.tp_ops import enter_tp
from paratrain.parallel.vocab import VocabParallelCrossEntropy, VocabParallelEmbedding

# the order styles are applied in: the vocab head and the loss need the embedding's shard
_ORDER = ("vocab_embedding", "vocab_head", "vocab_loss", "column", "row", "tp_input", "sp_norm", "sp_positions",
          "adjust")


def module_names(model: nn.Module) -> list[str]:
    """The model's module names with block indices folded (``transformer.h.*.attn``), in order:
    what an error shows so a plan can be written against it."""
    return list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n, _ in model.named_modules() if n))


def resolve(model: nn.Module, plan: TPPlan) -> list[tuple[str, nn.Module, TPStyle]]:
    """Every (name, module, style) the plan's patterns match; a pattern that matches nothing, or
    a module two patterns claim, is a ValueError listing the model's module names."""
    named = [(n, m) for n, m in model.named_modules() if n]
    out: dict[str, tuple[nn.Module, TPStyle]] = {}
    for pattern, value in plan.items():
        style = style_of(value)
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"the tensor-parallel plan names {pattern!r}, which matches no module of "
                             f"{type(model).__name__}; its modules are: {', '.join(module_names(model))}")
        for n, m in hits:
            if n in out:
                raise ValueError(f"module {n!r} is matched by two entries of the tensor-parallel plan; give it one")
            out[n] = (m, style)
    return [(n, m, s) for n, (m, s) in out.items()]


def _widths(module: nn.Module, kind: str) -> int | None:
    """The width a column (output features) or row (input features) style splits."""
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "column" else module.in_features
    if is_conv1d(module):
        rows, cols = module.weight.shape  # (in, out)
        return cols if kind == "column" else rows
    return None


def _check_one(name: str, module: nn.Module, style: TPStyle, tp: int) -> None:
    kind = style.kind
    if kind in ("column", "row", "vocab_head"):
        width = _widths(module, "column" if kind == "vocab_head" else kind)
        if width is None:
            raise ValueError(f"tensor-parallel style {kind!r} needs a linear layer (nn.Linear or Conv1D); "
                             f"{name!r} is a {type(module).__name__}")
        if kind == "vocab_head":
            if module.bias is not None:
                raise ValueError(f"the vocab-parallel head {name!r} has a bias; only a bias-free LM head is split")
            return
        part = width // style.chunks
        groups = part // style.unit
        if width % style.chunks or part % style.unit or groups % tp:
            valid = [t for t in range(1, groups + 1) if groups % t == 0] if part % style.unit == 0 else []
            what = f"{groups} {style.what}" if style.unit > 1 else f"width {part}"
            fused = f" (each of its {style.chunks} fused parts)" if style.chunks > 1 else ""
            raise ValueError(f"tp={tp} does not divide the {what} of {name!r}{fused}: tensor parallelism "
                             f"splits them evenly over the tp ranks; valid tp: {valid or 'none'}")
    elif kind == "vocab_embedding" and not isinstance(module, nn.Embedding):
        raise ValueError(f"style 'vocab_embedding' needs an nn.Embedding; {name!r} is a {type(module).__name__}")
    elif kind == "sp_positions" and not isinstance(module, nn.Embedding):
        raise ValueError(f"style 'sp_positions' needs an nn.Embedding; {name!r} is a {type(module).__name__}")


def check_tp_plan(model: nn.Module, plan: TPPlan, tp: int) -> list[tuple[str, nn.Module, TPStyle]]:
    """Resolve ``plan`` on ``model`` and check it can split it over ``tp`` ranks (ValueError:
    what is wrong and what is valid). Returns the resolved entries."""
    entries = resolve(model, plan)
    kinds = {s.kind for _, _, s in entries}
    if kinds & {"vocab_head", "vocab_loss"} and "vocab_embedding" not in kinds:
        raise ValueError("a tensor-parallel plan with 'vocab_head' or 'vocab_loss' needs one 'vocab_embedding' "
                         "(the vocabulary split they follow)")
    if sum(s.kind == "vocab_embedding" for _, _, s in entries) > 1:
        raise ValueError("a tensor-parallel plan splits one vocabulary: give one 'vocab_embedding'")
    for name, module, style in entries:
        _check_one(name, module, style, tp)
    return entries


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _enter_hook(group: Group, sp: bool) -> Callable[..., Any]:
    """A forward pre-hook: the module's first tensor input (positional, or ``hidden_states``)
    enters the tp region: f (backward: all-reduce), or the all-gather along the sequence."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (enter_tp(args[0], group, sp), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else \
            next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, key: enter_tp(kwargs[key], group, sp)}
    return hook


def apply_tp_plan(model: nn.Module, plan: TPPlan, group: Group, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` over ``group`` by ``plan``, in place; returns it. Collective-free: each
    rank slices its own shards from the reference weights it holds."""
    sp = sequence_parallel
    entries = sorted(check_tp_plan(model, plan, group.size), key=lambda e: _ORDER.index(e[2].kind))
    regions = [n for n, _, s in entries if s.kind == "tp_input"]
    embedding: VocabParallelEmbedding | None = None
    reference_emb: nn.Parameter | None = None
    for name, module, style in entries:
        kind = style.kind
        if kind == "vocab_embedding":
            reference_emb = module.weight
            embedding = VocabParallelEmbedding.from_embedding(module, group, sp)
            _set(model, name, embedding)
        elif kind == "vocab_head":
            assert embedding is not None
            tied = module.weight is reference_emb
            head = embedding.weight if tied else shard_parameter(
                module.weight, group, dim=0, padded_size=embedding.weight.shape[0] * group.size)
            _set(model, name, ColumnParallelLinear(head, None, group, sp))
        elif kind == "vocab_loss":
            assert embedding is not None
            _set(model, name, VocabParallelCrossEntropy(group, embedding.vocab_start, embedding.vocab_size))
        elif kind == "column":
            inside = any(name.startswith(r + ".") for r in regions)
            _set(model, name, ColumnParallelLinear.from_linear(module, group, sp, style.chunks, enter=not inside))
        elif kind == "row":
            _set(model, name, RowParallelLinear.from_linear(module, group, sp))
        elif kind == "tp_input":
            module.register_forward_pre_hook(_enter_hook(group, sp), with_kwargs=True)
        elif kind == "sp_norm" and sp:
            mark_partial_grad(module)
        elif kind == "sp_positions" and sp:
            _set(model, name, SequenceParallelPositions(module, group))
        elif kind == "adjust":
            assert style.fn is not None
            style.fn(module, group.size)
    return model
