"""ZeRO stage 3: parameters sharded over dp, all-gathered unit by unit when they are needed.

Units: each transformer block, and the *root*: everything outside the blocks (token and position
embeddings, final LayerNorm, LM head -- tied or not). A unit is one
:class:`~paratrain.parallel.zero.ShardedBucket`: its ``shard`` (1/n of the unit) is all a rank
stores between uses. Per micro-batch, in the order every rank runs them::

    forward   root: gathered by a pre-hook on the model, freed when the model's forward returns
              block i: gathered by a pre-hook on the block, freed by its forward hook
    backward  root: gathered again before the loss's backward (by _BeforeBackward on the loss)
              block i: gathered again before its backward (by _BeforeBackward on its output);
              when the unit's last gradient has arrived its bucket is reduce-scattered and the
              unit freed (``ZeroDataParallel._launch``); the root, whose token embedding gets
              its gradient last, is freed at the end

so each micro-batch moves every parameter twice by all-gather and its gradient once by
reduce-scatter: 3 psi of payload, 1.5x DP's traffic on the wire ([R20] sec. 7.2.2). With
``prefetch`` the next unit's all-gather is launched as soon as the current unit is in use
(forward: the next block; backward: the previous one), so it overlaps compute; at most two
units and the root are whole at a time.

Freeing resizes the flat buffer's storage to 0 bytes: the views autograd saved in forward (the
weights of linear layers) share that storage, so they are freed too, and see the same values
again once it is gathered back before backward. Between uses each parameter is a stride-0
placeholder of its shape (see ``ShardedBucket.free``); use
:meth:`ZeroDataParallel.full_params` to see them whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from paratrain.comm import Group
from paratrain.parallel.zero import ShardedBucket, ZeroDataParallel


class RunInBackward(torch.autograd.Function):
    """Identity on ``x``. Its backward runs ``fn`` before passing the gradient on: applied to a
    module's output, just before that module's backward (here: gather its parameters); applied to
    its input, once the module's backward has produced that input's gradient (zero3_pipeline:
    free its unit)."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[], None], x: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ctx.fn()
        return None, grad


_BeforeBackward = RunInBackward  # on a module's output


class UnitGathering:
    """The hooks that gather and free the units of ``model`` around their forward and backward.
    ``order`` is the units in forward order: the root, then block 0, 1, ..."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], order: list[ShardedBucket],
                 prefetch: bool = True) -> None:
        self.order = order
        self.prefetch = prefetch
        modules = [model, *blocks]
        self._hooks = []
        for pos, module in enumerate(modules):
            self._hooks.append(module.register_forward_pre_hook(self._pre_forward(pos)))
            self._hooks.append(module.register_forward_hook(self._post_forward(pos)))

    def _use(self, pos: int, backward: bool) -> None:
        """Make unit ``pos`` whole (waiting for its prefetch if there was one) and prefetch the
        unit that runs next: forward ``pos + 1``; backward ``pos - 1`` (after the root, the last
        block; the root itself stays gathered through backward)."""
        unit = self.order[pos]
        unit.gather()
        unit.wait_gathered()
        if not self.prefetch:
            return
        nxt = (len(self.order) - 1 if pos == 0 else pos - 1) if backward else pos + 1
        if 0 < nxt < len(self.order):
            self.order[nxt].gather(async_op=True)

    def _pre_forward(self, pos: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._use(pos, backward=False)
        return hook

    def _post_forward(self, pos: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            self.order[pos].free()
            if isinstance(out, torch.Tensor) and out.requires_grad and torch.is_grad_enabled():
                return _BeforeBackward.apply(lambda: self._use(pos, backward=True), out)
            return out
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def zero3(model: nn.Module, group: Group, bucket_mb: float = 25.0, overlap: bool = True,
          prefetch: bool = True, blocks: list[nn.Module] | None = None,
          runner: nn.Module | None = None, grad_dtype: torch.dtype | None = None,
          axes: tuple[str, ...] = ("dp",), skip: Sequence[nn.Parameter] = ()) -> ZeroDataParallel:
    """Shard ``model``'s parameters (``blocks``, default a GPT's ``model.blocks``, and the root)
    over ``group`` in place and install the gathering hooks; returns the gradient side (the
    GradSync). ``runner``: the module whose forward is the whole step's (default ``model``),
    around which the root is gathered. ``skip``: parameters sharded elsewhere (the experts, over
    edp: :func:`unit_per_module`)."""
    blocks = list(model.blocks if blocks is None else blocks)  # type: ignore[arg-type]
    skipped = {id(p) for p in skip}
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks | skipped]
    units = [[p for p in b.parameters() if p.requires_grad and id(p) not in skipped] for b in reversed(blocks)]
    assert all(units), "a block with nothing but skipped parameters"
    units += [root]
    sync = ZeroDataParallel(model, group, 3, bucket_mb, overlap, units=units, grad_dtype=grad_dtype, axes=axes,
                            params=[p for u in units for p in u])
    order = [sync.buckets[-1], *reversed(sync.buckets[:-1])]  # forward order
    sync.gathering = UnitGathering(model if runner is None else runner, blocks, order, prefetch)
    return sync


def unit_per_module(model: nn.Module, modules: list[nn.Module], group: Group, bucket_mb: float = 25.0,
                    overlap: bool = True, grad_dtype: torch.dtype | None = None,
                    axes: tuple[str, ...] = ("dp",)) -> ZeroDataParallel:
    """ZeRO-3 over ``group`` for the parameters of ``modules`` (in forward order), one unit each,
    gathered around each module's own forward and backward (no prefetch): the local experts of
    every MoE block, sharded over the ranks that replicate them."""
    units = [[p for p in m.parameters() if p.requires_grad] for m in reversed(modules)]
    sync = ZeroDataParallel(model, group, 3, bucket_mb, overlap, units=units, grad_dtype=grad_dtype, axes=axes,
                            params=[p for u in units for p in u])
    # UnitGathering's position 0 is a root only for prefetching, which is off here
    sync.gathering = UnitGathering(modules[0], modules[1:], list(reversed(sync.buckets)), prefetch=False)
    return sync
