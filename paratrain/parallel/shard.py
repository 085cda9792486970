"""Slicing reference tensors into tensor-parallel shards, and putting them back together.

A sharded tensor is described by ``(dim, chunks)``: along ``dim`` it is ``chunks`` equal blocks,
and each block is split evenly over the ``n`` tp ranks. Rank r's shard is the concatenation of
its piece of every block::

    shard_r = cat_c( block_c[r] )          unshard(shards) = cat_c( cat_r( shard_r[c] ) )

``chunks = 1`` is a plain split (fc1's rows, fc2's columns, the embedding's rows). The fused
attention input ``qkv.weight`` is ``[W_q; W_k; W_v]`` (3H, H): with ``chunks = 3`` rank r gets
``[W_q[r]; W_k[r]; W_v[r]]``, the q, k and v rows of *its* heads, so ``chunk(3)`` of its output
still yields q, k and v.

Parameters carry their description as marks (``paratrain.parallel.marks``), read by
:func:`gather_full_state` and by the gradient-norm code (``paratrain.parallel.grad``):

* ``tp_split = (dim, chunks)`` and ``"tp"`` in ``sharded`` — a different slice per tp rank;
* ``tp_size = V`` — the reference size along ``dim`` when the tensor was padded with zeros
  before slicing (the vocabulary, ``config.padded_vocab_size``): the concatenated shards hold
  ``padded`` rows, of which the first V are the reference's and the rest zero;
* ``partial_grad`` — replicated, but each tp rank's gradient is a partial sum over its slice of
  the sequence (sequence parallelism); the gradients must be summed over tp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.parallel import marks


def shard(t: torch.Tensor, rank: int, n: int, dim: int = 0, chunks: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of ``t`` (of ``n``), as a new tensor with its own storage."""
    blocks = t.chunk(chunks, dim)
    assert all(b.shape[dim] % n == 0 for b in blocks), f"{tuple(t.shape)} dim {dim} not divisible by {n}"
    return torch.cat([b.chunk(n, dim)[rank] for b in blocks], dim).clone()


def unshard(shards: Sequence[torch.Tensor], dim: int = 0, chunks: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard, in rank order."""
    pieces = [s.chunk(chunks, dim) for s in shards]
    return torch.cat([pieces[r][c] for c in range(chunks) for r in range(len(shards))], dim)


def pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` followed by zeros along ``dim`` up to ``size`` (``t`` itself when already that size)."""
    extra = size - t.shape[dim]
    assert extra >= 0, f"cannot pad {tuple(t.shape)} dim {dim} down to {size}"
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)


def shard_parameter(p: nn.Parameter, group: Group, dim: int = 0, chunks: int = 1,
                    padded_size: int | None = None) -> nn.Parameter:
    """This rank's shard of a reference parameter, as a new marked parameter. ``padded_size``
    (``chunks = 1`` only): pad ``p`` with zero rows along ``dim`` to that size first, so the
    shard of the last rank(s) ends in (or is all) zero rows."""
    t = p.detach()
    if padded_size is not None:
        assert chunks == 1, "padding is defined for a plain split only"
        t = pad(t, dim, padded_size)
    out = nn.Parameter(shard(t, group.rank, group.size, dim, chunks), requires_grad=p.requires_grad)
    marks.mark_tp_split(out, dim, chunks, p.shape[dim] if t.shape[dim] != p.shape[dim] else None)
    return out


def full_shape(t: torch.Tensor, n: int) -> torch.Size:
    """The reference shape of ``t``, this rank's tensor in a tp group of ``n`` (a shard: its
    split dimension times n, less the padding; anything else: its own shape)."""
    shape = list(t.shape)
    split = marks.tp_split(t)
    if split is not None:
        shape[split[0]] = marks.tp_size(t) or shape[split[0]] * n
    return torch.Size(shape)


def mark_partial_grad(module: nn.Module) -> list[nn.Parameter]:
    """Mark every parameter of ``module`` as replicated-with-partial-gradients; returns them."""
    params = list(module.parameters())
    for p in params:
        marks.mark_partial_grad(p)
    return params


def _gather(t: torch.Tensor, group: Group, dim: int, chunks: int, size: int | None) -> torch.Tensor:
    """The full tensor from every rank's shard ``t``; padding (rows ``size`` on) dropped."""
    local = t.detach().contiguous()
    buf = local.new_empty((group.size * local.numel(),))
    comm.all_gather(buf, local.view(-1), group, tag="checkpoint")
    full = unshard(buf.view(group.size, *local.shape).unbind(0), dim, chunks)
    return full if size is None else full.narrow(dim, 0, size).contiguous()


def gather_full_state(module: nn.Module, group: Group, grads: bool = False) -> dict[str, torch.Tensor] | None:
    """``module``'s state dict with every tp shard gathered back to the reference shape: on tp
    index 0, None on the others (``grads=True``: the parameters' gradients instead, zeros where
    there is none). Padding rows are dropped: the result has the reference's shapes. Every rank
    of ``group`` must call it. The all-gathers (padding included) are filed under
    ``"checkpoint"`` in the group's counters."""
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # a tied weight appears under two names; gather it once
    for name, t in module.state_dict(keep_vars=True).items():
        value = t.detach()
        if grads:
            value = torch.zeros_like(value) if t.grad is None else t.grad.detach()
        split = marks.tp_split(t)
        if id(t) not in done:
            done[id(t)] = value if split is None else _gather(value, group, *split, marks.tp_size(t))
        out[name] = done[id(t)]
    return out if group.rank == 0 else None
