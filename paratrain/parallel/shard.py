"""Slicing reference tensors into tensor-parallel shards, and putting them back together.

A sharded tensor is described by ``(dim, chunks)``: along ``dim`` it is ``chunks`` equal blocks,
and each block is split evenly over the ``n`` tp ranks. Rank r's shard is the concatenation of
its piece of every block::

    shard_r = cat_c( block_c[r] )          unshard(shards) = cat_c( cat_r( shard_r[c] ) )

``chunks = 1`` is a plain split (fc1's rows, fc2's columns, the embedding's rows). The fused
attention input ``qkv.weight`` is ``[W_q; W_k; W_v]`` (3H, H): with ``chunks = 3`` rank r gets
``[W_q[r]; W_k[r]; W_v[r]]``, the q, k and v rows of *its* heads, so ``chunk(3)`` of its output
still yields q, k and v.

Parameters carry their description as attributes, read by :func:`gather_full_state` and by the
gradient-norm code (``paratrain.parallel.grad``):

* ``_pt_tp_split = (dim, chunks)`` and ``_pt_sharded = {"tp"}`` — a different slice per tp rank;
* ``_pt_tp_partial_grad = True`` — replicated, but each tp rank's gradient is a partial sum over
  its slice of the sequence (sequence parallelism); the gradients must be summed over tp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group


def shard(t: torch.Tensor, rank: int, n: int, dim: int = 0, chunks: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of ``t`` (of ``n``), as a new tensor with its own storage."""
    blocks = t.chunk(chunks, dim)
    assert all(b.shape[dim] % n == 0 for b in blocks), f"{tuple(t.shape)} dim {dim} not divisible by {n}"
    return torch.cat([b.chunk(n, dim)[rank] for b in blocks], dim).clone()


def unshard(shards: Sequence[torch.Tensor], dim: int = 0, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard, in rank order."""
    pieces = [s.chunk(chunks, dim) for s in shards]
    return torch.cat([pieces[r][c] for c in range(chunks) for r in range(len(shards))], dim)


def shard_parameter(p: nn.Parameter, group: Group, dim: int = 0, chunks: int = 1) -> nn.Parameter:
    """This rank's shard of a reference parameter, as a new marked parameter."""
    out = nn.Parameter(shard(p.detach(), group.rank, group.size, dim, chunks), requires_grad=p.requires_grad)
    out._pt_tp_split = (dim, chunks)
    out._pt_sharded = frozenset({"tp"})
    return out


def mark_partial_grad(module: nn.Module) -> list[nn.Parameter]:
    """Mark every parameter of ``module`` as replicated-with-partial-gradients; returns them."""
    params = list(module.parameters())
    for p in params:
        p._pt_tp_partial_grad = True
    return params


def partial_grad_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if getattr(p, "_pt_tp_partial_grad", False)]


def _gather(t: torch.Tensor, group: Group, dim: int, chunks: int) -> torch.Tensor:
    local = t.detach().contiguous()
    buf = local.new_empty((group.size * local.numel(),))
    comm.all_gather(buf, local.view(-1), group, tag="checkpoint")
    return unshard(buf.view(group.size, *local.shape).unbind(0), dim, chunks)


def gather_full_state(module: nn.Module, group: Group, grads: bool = False) -> dict[str, torch.Tensor] | None:
    """``module``'s state dict with every tp shard gathered back to the reference shape: on tp
    index 0, None on the others (``grads=True``: the parameters' gradients instead, zeros where
    there is none). Every rank of ``group`` must call it. The all-gathers are filed under
    ``"checkpoint"`` in the group's counters."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # a tied weight appears under two names; gather it once
    for name, t in module.state_dict(keep_vars=True).items():
        value = t.detach()
        if grads:
            value = torch.zeros_like(value) if t.grad is None else t.grad.detach()
        split = getattr(t, "_pt_tp_split", None)
        if id(t) not in done:
            done[id(t)] = value if split is None else _gather(value, group, *split)
        out[name] = done[id(t)]
    return out if group.rank == 0 else None
