"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with sequence parallelism (Korthikanti
et al. 2022): every block's matrices split over the ``n`` ranks of the tp group.

Per block (pre-LN; X is (B, T, H), replicated on every tp rank)::

    attention:  [Q_r K_r V_r] = f(LN1(X)) W_qkv,r      column-parallel: this rank's H/n-wide heads
                Z = g( attn(Q_r, K_r, V_r) W_proj,r )  row-parallel: partial sums, all-reduced
    MLP:        Y_r = GELU( f(LN2(X)) W_1,r )         column-parallel: F/n columns
                Z = g( Y_r W_2,r )                     row-parallel

so two all-reduces in forward (the g's) and two in backward (the f's) per block. With sequence
parallelism the tensors between blocks, and the LayerNorms and dropouts on them, are split along
the sequence (B, T/n, H): each g becomes a reduce-scatter and each f an all-gather (the same
bytes on the wire, since an all-reduce is a reduce-scatter plus an all-gather; and 1/n of the
LayerNorm/dropout work and activations). The LayerNorm weights, the row-parallel
biases and the position embedding then see only this rank's tokens, so their gradients are
summed over tp after backward (:class:`SequenceParallelGradSync`).

The vocabulary is split too (``parallel/vocab.py``): the embedding's partial lookups are summed
like a row-parallel output, the (tied or untied) LM head is column-parallel, and the
cross-entropy works on vocab-split logits. :func:`tensor_parallel` applies all of it to the
reference model by *slicing its weights*. The traffic is stated by
:func:`paratrain.core.traffic.tp_comm_per_step` (torch-free, shared with the planner).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.parallel import marks
from paratrain.parallel.grad import collective_device
from paratrain.parallel.rng import ShardedRNG
from paratrain.parallel.shard import mark_partial_grad, shard_parameter
from paratrain.parallel.tp_ops import enter_tp, gathered_linear_sp, leave_tp

if TYPE_CHECKING:
    from paratrain.models.gpt import GPT
    from paratrain.parallel.model import GradSync


class ColumnParallelLinear(nn.Module):
    """``Y_r = X W_r^T + b_r``: the output features split over tp (W (out, in) by rows).

    Input (B, T, in), replicated — or (B, T/n, in) under sequence parallelism, all-gathered
    first. Output (B, T, out/n): this rank's columns of Y. Forward: f (or all-gather);
    backward: all-reduce of dL/dX (or reduce-scatter). ``enter=False``: the input is already
    inside the tp region (an enclosing ``tp_input`` module entered it), so neither happens here.
    ``transposed``: the weight is stored (in, out/n), as Hugging Face's ``Conv1D`` stores it.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group: Group,
                 sequence_parallel: bool = False, enter: bool = True, transposed: bool = False) -> None:
        super().__init__()
        self.weight = weight  # (out/n, in), or (in, out/n) transposed
        self.bias = bias      # (out/n,) or None
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.enter = enter
        self.transposed = transposed

    @classmethod
    def from_linear(cls, linear: nn.Module, group: Group, sequence_parallel: bool = False,
                    chunks: int = 1, enter: bool = True) -> ColumnParallelLinear:
        """Slice a reference linear (``nn.Linear`` or a transposed ``Conv1D``); ``chunks`` = 3
        for the fused [q; k; v] outputs."""
        transposed = is_conv1d(linear)
        bias = None if linear.bias is None else shard_parameter(linear.bias, group, 0, chunks)
        weight = shard_parameter(linear.weight, group, 1 if transposed else 0, chunks)
        return cls(weight, bias, group, sequence_parallel, enter, transposed)

    #: under sequence parallelism, save the input's sequence slice and all-gather it again in
    #: backward (``tp_ops.GatheredLinearSP``); off where the gathered input is kept anyway (full
    #: recomputation replays the gather; a zero-bubble W needs the whole input later)
    regather: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter and self.sequence_parallel and self.regather and torch.is_grad_enabled():
            return gathered_linear_sp(x, self.weight, self.bias, self.group, self.transposed)
        if self.enter:
            x = enter_tp(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight.t() if self.transposed else self.weight, self.bias)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape[::-1] if self.transposed else self.weight.shape
        return f"in={inp}, out_local={out}, tp={self.group.size}, sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """``Z = sum_r Y_r W_r^T + b``: the input features split over tp (W (out, in) by columns).

    Input (B, T, in/n): this rank's slice, as a column-parallel layer produces it. Output
    (B, T, out) replicated — or (B, T/n, out) under sequence parallelism. Forward: g, an
    all-reduce of the partial products (or reduce-scatter); backward: identity (or all-gather).
    The bias is added once, after the sum. ``transposed``: see :class:`ColumnParallelLinear`.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group: Group,
                 sequence_parallel: bool = False, transposed: bool = False) -> None:
        super().__init__()
        self.weight = weight  # (out, in/n), or (in/n, out) transposed
        self.bias = bias      # (out,), replicated
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.transposed = transposed
        if bias is not None and sequence_parallel:
            marks.mark_partial_grad(bias)  # added to this rank's tokens only

    @classmethod
    def from_linear(cls, linear: nn.Module, group: Group, sequence_parallel: bool = False) -> RowParallelLinear:
        transposed = is_conv1d(linear)
        bias = None if linear.bias is None else linear.bias  # replicated: the reference parameter
        return cls(shard_parameter(linear.weight, group, dim=0 if transposed else 1), bias, group,
                   sequence_parallel, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = leave_tp(F.linear(x, self.weight.t() if self.transposed else self.weight), self.group,
                     self.sequence_parallel)
        return z if self.bias is None else z + self.bias

    def extra_repr(self) -> str:
        out, inp = self.weight.shape[::-1] if self.transposed else self.weight.shape
        return f"in_local={inp}, out={out}, tp={self.group.size}, sp={self.sequence_parallel}"


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class SequenceParallelPositions(nn.Module):
    """The position embedding under sequence parallelism: given all T positions, returns the
    rows of this rank's slice of the sequence, (T/n, H), to add to its (B, T/n, H) tokens. The
    weight is the reference's, replicated; its gradient is partial (this rank's positions)."""

    def __init__(self, emb: nn.Embedding, group: Group) -> None:
        super().__init__()
        self.weight = emb.weight
        self.group = group
        mark_partial_grad(self)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return F.embedding(pos.chunk(self.group.size)[self.group.rank], self.weight)


def _on_sharded_stream(dropout: nn.Dropout, rng: ShardedRNG) -> None:
    dropout.forward = rng.wrap(dropout.forward, dropout)


def tensor_parallel(model: GPT, group: Group, rng: ShardedRNG, sequence_parallel: bool = False) -> GPT:
    """Shard the reference ``model`` over ``group`` in place and return it: the GPT's plan
    (``models/plans.gpt_tp_plan``) applied by :func:`paratrain.parallel.tp_plan.apply_tp_plan`,
    plus the GPT's dropout streams.

    Every parallel weight is sliced from the reference (never re-initialised); replicated ones
    (LayerNorms, row-parallel biases, positions) are the reference's own parameters. Dropout in
    sharded regions (this rank's attention heads; under sequence parallelism also the residual
    stream's) draws from ``rng``, the stream that differs between tp ranks; the replicated
    regions keep the default generator, equal on all tp ranks (see ``parallel/rng.py``). On a
    group of one every collective is a no-op and the model computes what the reference does.
    A vocabulary the group's size does not divide is padded with zero rows to
    ``config.padded_vocab_size`` (embedding and head alike; masked out of the loss, see
    ``parallel/vocab.py``).
    """
    from paratrain.models.plans import gpt_tp_plan
    from paratrain.parallel.tp_plan import apply_tp_plan

    sp = sequence_parallel
    apply_tp_plan(model, gpt_tp_plan(model.cfg), group, sp)
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        attn.attend = rng.wrap(attn.attend, attn, "attn_dropout")  # this rank's heads
        if sp:
            _on_sharded_stream(attn.resid_drop, rng)
            _on_sharded_stream(mlp.drop, rng)
    if sp:
        _on_sharded_stream(model.drop, rng)
    return model


class SequenceParallelGradSync:
    """A :class:`~paratrain.parallel.model.GradSync` that, after ``inner`` has reduced the
    gradients over dp, sums over tp those of ``params`` (replicated parameters that each tp
    rank only applied to its slice of the sequence): one all-reduce of one flat buffer per step.
    The sums over dp and tp commute, so the order does not matter. Under ZeRO ``params`` are
    the dp shards of those parameters (the same shards on every tp rank)."""

    def __init__(self, inner: GradSync, params: list[torch.Tensor], group: Group) -> None:
        self.inner = inner
        self.params = params
        self.group = group
        self._sync = True

    @property
    def grad_scale(self) -> float:
        return self.inner.grad_scale

    @property
    def grad_params(self) -> list[torch.Tensor]:
        return self.inner.grad_params

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.inner.shard_optimizer(optimizer)

    def full_params(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.full_params()

    def set_sync(self, sync: bool) -> None:
        self._sync = sync
        self.inner.set_sync(sync)

    def finish(self) -> None:
        self.inner.finish()
        if not self._sync:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = flat.to(collective_device(flat))  # offloaded masters' gradients: reduced on the device
        comm.all_reduce(flat, self.group)
        offset = 0
        for p, g in zip(self.params, grads):
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            p.grad = g
            offset += g.numel()

    def zero_grad(self) -> None:
        self.inner.zero_grad()
