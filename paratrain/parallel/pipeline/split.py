"""The backward split of zero-bubble schedules: ``I`` (input gradient) now, ``W`` (weight
gradients) later.

For a linear ``y = x W^T + b`` the backward is three matmul-sized pieces:

    dL/dx = dy W          (I: the previous stage waits for it)
    dL/db = sum dy        (cheap: done in I)
    dL/dW = dy^T x        (W: nothing waits for it)

While a micro-batch's chunk runs forward under :class:`SplitLinears`, every ``F.linear`` whose
weight needs a gradient (``nn.Linear``, the column- and row-parallel linears, the LM head) runs
as :class:`_SplitLinear`, which sees the weight detached (the autograd graph has no edge to it,
so the weight's gradient hooks do not fire in ``I``). Its backward computes ``dL/dx`` and
``dL/db`` and queues ``(W, x, dy)`` on the chunk's :class:`WeightGrads` instead of ``dL/dW``. ``I`` is then
the chunk's ordinary ``y.backward(dy)`` (every other gradient -- layer norms, embeddings --
is computed there; the autograd graph is freed as usual), and ``W`` is
:meth:`WeightGrads.run`: the queued matmuls, accumulated into ``W.grad`` through autograd (so
data parallelism's gradient hooks see them). Between the two, only the queued ``x`` and ``dy``
of each linear stay alive: the W-deferred memory. A plain ``B`` is the same backward with
nothing deferred.

Tensor parallelism: a linear's tp collective (the all-reduce of a column-parallel input
gradient, the gather/reduce-scatter of sequence parallelism) belongs to ``dL/dx``, so it runs
in ``I``; ``dL/dW`` is local to the shard (its ``x`` was gathered in the forward), so ``W``
communicates nothing.

Why this and not two ``autograd.grad`` calls (``I`` for the input with ``retain_graph=True``,
``W`` for the parameters): the second call walks the whole graph again, recomputing every
activation gradient of the chunk, so ``I + W`` costs about two backwards instead of one, and
the whole graph stays alive until ``W``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from paratrain.parallel.memory import hold

_LINEAR = F.linear  # the real one, whatever SplitLinears has put in its place


class WeightGrads:
    """The deferred ``dL/dW`` of one micro-batch through one chunk."""

    def __init__(self) -> None:
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] = []  # (W, x, dy, meter token)

    def run(self) -> None:
        """``W``: every queued ``dL/dW = dy^T x``, accumulated into ``W.grad`` (one autograd
        call, so post-accumulate hooks fire once per weight); frees ``x`` and ``dy``."""
        weights, grads = [], []
        for weight, x, dy, _held in self.queue:
            g = dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
            weights.append(weight)
            grads.append(g.to(weight.dtype))
        self.queue.clear()
        if weights:
            torch.autograd.backward(weights, grads)


class _SplitLinear(torch.autograd.Function):
    """``y = x W^T + b``; backward: ``dx = dy W`` and ``db = sum dy``, with ``dW = dy^T x``
    queued on ``box`` (see the module docstring); ``weight``: the parameter in a tuple (no
    autograd edge to it), ``detached`` its data. Under autocast the matmuls run in the autocast dtype, as
    ``F.linear`` would."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, detached: torch.Tensor, bias: torch.Tensor | None,
                box: WeightGrads, weight: tuple[torch.Tensor]) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x_c, w_c = x.to(dtype), detached.to(dtype)
            b_c = None if bias is None else bias.to(dtype)
        else:
            x_c, w_c, b_c = x, detached, bias
        with torch.autocast(device, enabled=False):
            y = _LINEAR(x_c, w_c, b_c)
        ctx.save_for_backward(x_c, w_c)
        ctx.box, ctx.x_dtype, ctx.has_bias, (ctx.weight,) = box, x.dtype, bias is not None, weight
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        dx = dy.matmul(w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        ctx.box.queue.append((ctx.weight, x, dy, hold(x, dy)))  # counted by --measure-memory until W
        return dx, None, db, None, None


class SplitLinears:
    """While active (a ``with`` block), ``F.linear`` with a weight that needs a gradient runs as
    :class:`_SplitLinear`, its weight gradient deferred to ``box``.

    It swaps the ``torch.nn.functional.linear`` attribute for the block (``nn.Linear``, our tp
    linears and Hugging Face's layers all call it through the module) rather than entering a
    ``TorchFunctionMode``: a mode sees every torch call of the forward, and measured here
    (``small``, two layers, a (2, 128) micro-batch, one thread, medians of 20) it made the forward
    15% slower than a plain one (the swap: within noise) and I + W 19% slower than a plain
    backward (the swap: about 10%, the weight-gradient matmuls run outside autograd's own linear
    backward). Not reentrant across threads: a rank runs its chunks on one thread."""

    def __init__(self, box: WeightGrads) -> None:
        self.box = box
        self._outer: Any = None

    def __enter__(self) -> SplitLinears:
        box, outer = self.box, F.linear
        self._outer = outer

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            if torch.is_grad_enabled() and weight.requires_grad:
                # the parameter travels in a tuple: as an argument it would get an autograd edge
                return _SplitLinear.apply(x, weight.detach(), bias, box, (weight,))
            return outer(x, weight, bias)

        F.linear = linear
        return self

    def __exit__(self, *exc: object) -> None:
        F.linear = self._outer
