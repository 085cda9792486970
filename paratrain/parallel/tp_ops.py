"""Tensor-parallel communication as small autograd functions over an explicit tp :class:`Group`.

These are Megatron's *f* and *g* and their sequence-parallel forms. Every one moves data through
:mod:`paratrain.comm`, so each byte is counted, and every one is the identity on a group of one.

Notation: ``n`` = tp size, B batch, T sequence, H hidden. A tensor *sharded along the sequence*
has shape (B, T/n, H); rank r holds positions [r T/n, (r+1) T/n).

==========================  =============================  =============================
function                    forward                        backward
==========================  =============================  =============================
``copy_to_tp``       (f)    identity                       all-reduce (sum)
``reduce_from_tp``   (g)    all-reduce (sum)               identity
``gather_from_sp``          all-gather along T             reduce-scatter along T
``reduce_scatter_to_sp``    reduce-scatter along T         all-gather along T
==========================  =============================  =============================

Why they come in conjugate pairs: a column-parallel ``Y_r = X W_r`` needs X on every rank, and
``dL/dX = sum_r dL/dY_r W_r^T`` — a sum over ranks, f's backward. A row-parallel
``Z = sum_r Y_r W'_r`` needs the sum in forward (g), and since ``dL/dZ`` is then the same on every
rank, ``dL/dY_r = dL/dZ W'_r^T`` needs nothing in backward. Sequence parallelism keeps the
tensors between the row- and the next column-parallel layer sharded along T: the all-reduce
``g`` becomes a reduce-scatter (each rank keeps its slice of the sum) and ``f`` becomes the
all-gather that puts the slices back together; each backward is the other one. An all-reduce
is a reduce-scatter followed by an all-gather, so the bytes moved are the same.
"""

from __future__ import annotations

from typing import Any

import torch

from paratrain import comm
from paratrain.comm import Group


def gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, T/n, ...) -> (B, T, ...): every rank's slice of the sequence, in rank order."""
    n = group.size
    x = x.contiguous()
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    out = x.new_empty((n * b, t, *rest))  # gloo wants the concatenation along dim 0
    comm.all_gather(out, x, group)
    return out.view(n, b, t, *rest).transpose(0, 1).reshape(b, n * t, *rest)


def reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, T, ...) partial sums -> (B, T/n, ...): this rank's slice of the sum over ranks."""
    n = group.size
    b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
    assert t % n == 0, f"sequence length {t} not divisible by tp={n}"
    stacked = x.reshape(b, n, t // n, *rest).transpose(0, 1).contiguous()  # (n, B, T/n, ...)
    out = x.new_empty((b, t // n, *rest))
    comm.reduce_scatter(out, stacked.view(n * b, t // n, *rest), group)
    return out


class CopyToTP(torch.autograd.Function):
    """f — forward: identity (the input is already replicated on every tp rank);
    backward: all-reduce (sum) of the gradient over tp, ``dL/dX = sum_r dL/dX_r``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # A copy: the incoming gradient may be shared with another branch of the graph.
        grad = grad.clone(memory_format=torch.contiguous_format)
        comm.all_reduce(grad, ctx.group)
        return grad, None


class ReduceFromTP(torch.autograd.Function):
    """g — forward: all-reduce (sum) over tp of the per-rank partial results, in place;
    backward: identity (the gradient of a replicated output is already replicated)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        assert x.is_contiguous()
        ctx.mark_dirty(x)
        comm.all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class GatherFromSP(torch.autograd.Function):
    """Sequence-parallel f — forward: all-gather along the sequence, (B, T/n, H) -> (B, T, H);
    backward: reduce-scatter along the sequence, (B, T, H) -> (B, T/n, H): this rank's slice of
    the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return gather_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter_seq(grad, ctx.group), None


class ReduceScatterToSP(torch.autograd.Function):
    """Sequence-parallel g — forward: reduce-scatter along the sequence, partial sums
    (B, T, H) -> this rank's slice of their sum (B, T/n, H); backward: all-gather along the
    sequence, (B, T/n, H) -> (B, T, H)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gather_seq(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return ReduceFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return ReduceScatterToSP.apply(x, group)


def enter_tp(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Into a tensor-parallel region (the input of a column-parallel layer): f, or the
    all-gather along the sequence under sequence parallelism."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def leave_tp(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Out of a tensor-parallel region (partial sums from a row-parallel layer or the
    vocab-parallel embedding): g, or the reduce-scatter along the sequence."""
    return reduce_scatter_to_sp(x, group) if sequence_parallel else reduce_from_tp(x, group)


class GatheredLinearSP(torch.autograd.Function):
    """A column-parallel linear under sequence parallelism that keeps only this rank's slice of
    its input for backward, as Megatron does (Korthikanti et al. 2022, sec. 4.2.2).

    Forward: ``x`` (B, T/n, in) is all-gathered to (B, T, in) and ``y = x W^T + b`` computed;
    only the slice ``x`` is saved, so the layer stores (s b h / n) instead of (s b h) elements.
    Backward: the all-gather runs again (asynchronously, while ``dL/dx = dy W`` is computed: the
    two overlap), then ``dL/dW = dy^T x`` with the regathered input, and ``dL/dx`` is
    reduce-scattered along the sequence, exactly :class:`GatherFromSP`'s backward. One more
    all-gather per layer and step buys ``(n - 1)/n`` of that input's memory. ``transposed``: the
    weight is stored (in, out/n) (Hugging Face's ``Conv1D``). Under autocast the matmuls run in
    the autocast dtype, as ``F.linear`` would, and the saved slice is in that dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group,
                transposed: bool) -> torch.Tensor:
        device = x.device.type
        full = gather_seq(x, group)  # in x's dtype, as GatherFromSP: the same bytes on the wire
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # a cast is elementwise: the cast slice is the slice of the cast gathered input
        x_c, full, w_c = x.to(dtype), full.to(dtype), weight.to(dtype)
        b_c = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            y = torch.nn.functional.linear(full, w_c.t() if transposed else w_c, b_c)
        ctx.save_for_backward(x_c.contiguous(), w_c)
        ctx.group, ctx.transposed, ctx.has_bias = group, transposed, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        group, n = ctx.group, ctx.group.size
        b, t, rest = x.shape[0], x.shape[1], x.shape[2:]
        gathered = x.new_empty((n * b, t, *rest))
        handle = comm.all_gather(gathered, x, group, async_op=True)  # overlaps dL/dx's matmul
        dy = dy.contiguous()
        dx_full = dy.matmul(w.t() if ctx.transposed else w) if ctx.needs_input_grad[0] else None
        if handle is not None:
            handle.wait()
        full = gathered.view(n, b, t, *rest).transpose(0, 1).reshape(b, n * t, *rest)
        dw = None
        if ctx.needs_input_grad[1]:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), full.reshape(-1, full.shape[-1])
            dw = (x2.t().matmul(dy2) if ctx.transposed else dy2.t().matmul(x2)).to(ctx.dtypes[1])
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.dtypes[1])
        # the input's gradient summed over tp in its own dtype, as GatherFromSP's backward sums it
        dx = reduce_scatter_seq(dx_full.to(ctx.dtypes[0]), group) if dx_full is not None else None
        return dx, dw, db, None, None


def gathered_linear_sp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: Group,
                       transposed: bool = False) -> torch.Tensor:
    return GatheredLinearSP.apply(x, weight, bias, group, transposed)
