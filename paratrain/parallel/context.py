"""Context parallelism: every sequence split over the ``N`` ranks of the cp group, attention as
ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the causal load
balance of Megatron-Core's context parallelism).

Tokens. The ``T`` positions of a sequence are cut into ``2N`` chunks of ``c = T / 2N``; cp rank
``i`` holds chunks ``i`` and ``2N - 1 - i`` (``T/N`` tokens) through the whole model. Under the
causal mask a query chunk ``a`` attends to key chunks ``<= a``, so an early chunk has little work
and a late one much; pairing chunk ``i`` with chunk ``2N - 1 - i`` gives every rank the same work
(``2 c^2`` score elements per ring step, the diagonal step included)::

    T = 8c, N = 4 (ranks 0..3):   chunk  0  1  2  3  4  5  6  7
                                  rank   0  1  2  3  3  2  1  0

Everything but attention is per token, so it runs on the local tokens unchanged; positions are
the chunks' *global* positions (:class:`ContextParallelPositions`).

Attention. Rank ``i`` keeps its queries ``Q_i`` (B, h, 2c, d) and passes its keys and values
around the ring: at step ``s`` it holds ``K_j, V_j`` of rank ``j = i - s (mod N)``, sends them on
to ``i + 1`` and receives the next from ``i - 1`` while it computes (the transfer overlaps the
block). Each block's scores give a partial output and log-sum-exp, merged online::

    S = Q K_j^T / sqrt(d)   (masked)     lse_b = logsumexp(S)     O_b = softmax(S) V_j
    lse' = log(e^lse + e^lse_b)          O' = O e^(lse - lse') + O_b e^(lse_b - lse')

so no rank holds the full T x T scores or the full K, V. Which blocks are computed (``c`` rows
or columns, as :func:`ring_blocks` lists): ``j = i``: the two diagonal chunks (causal) and late
queries x early keys (full); ``j < i``: all queries x ``K_j``'s early chunk; ``j > i``: the late
queries x all of ``K_j``; every other pair is masked out entirely and skipped.

Backward (FlashAttention-2's): with the final ``O`` and ``lse``, ``D = rowsum(dO * O)``, per block
``P = exp(S - lse)``, ``dV_j += P^T dO``, ``dS = P (dO V_j^T - D)``, ``dQ += dS K_j / sqrt(d)``,
``dK_j += dS^T Q / sqrt(d)``. On CPU each block's forward and backward is PyTorch's fused
attention kernel (the one ``scaled_dot_product_attention`` runs there, which returns the
log-sum-exp and whose backward takes the final ``O`` and ``lse`` as given); elsewhere the
explicit steps. Measured here (``small``'s attention, 8 sequences, cp 2, forward + backward
of one layer, median of 27): 23-25 ms with the explicit steps, 21-21.5 ms with the kernel; most
of the rest is the ring's transfers, which the ranks wait for when they fill every core.

K/V go around the ring again in backward; their gradients (fp32) travel with them, each rank
adding its share, and one last hop delivers ``dK_i, dV_i`` to rank ``i``.
Traffic: :func:`paratrain.core.traffic.cp_traffic`. Not PyTorch's experimental context-parallel
API: our own autograd function over :mod:`paratrain.comm` (every byte counted).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paratrain import comm
from paratrain.comm import P2P, Group, Handle
from paratrain.parallel.tensor import SequenceParallelPositions

Block = tuple[slice, slice, bool]  # (query rows, key columns, causal diagonal)


def chunk_positions(local_len: int, rank: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The global positions of cp rank ``rank``'s ``local_len = T / n`` tokens: chunks ``rank`` and
    ``2n - 1 - rank`` of ``c = local_len / 2`` positions each."""
    c = local_len // 2
    assert 2 * c == local_len, f"a cp rank holds two equal chunks; got {local_len} tokens"
    early = torch.arange(rank * c, (rank + 1) * c, device=device)
    late = torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c, device=device)
    return torch.cat([early, late])


def split_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, T, ...) -> (B, T/n, ...): this rank's two chunks of every sequence (tokens, targets)."""
    if group.size == 1:
        return x
    return x.index_select(1, chunk_positions(x.shape[1] // group.size, group.rank, group.size, x.device))


def gather_sequence(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_sequence` over every rank's (B, T/n, ...) part: (B, T, ...)."""
    n = len(parts)
    out = parts[0].new_empty((parts[0].shape[0], parts[0].shape[1] * n, *parts[0].shape[2:]))
    for r, part in enumerate(parts):
        out[:, chunk_positions(part.shape[1], r, n, part.device)] = part
    return out


def ring_blocks(rank: int, source: int, c: int) -> list[Block]:
    """The score blocks rank ``rank``'s queries compute against rank ``source``'s keys (each has
    chunks of ``c`` tokens: early then late); the rest of the pair is masked out."""
    early, late, both = slice(0, c), slice(c, 2 * c), slice(0, 2 * c)
    if source == rank:
        return [(early, early, True), (late, early, False), (late, late, True)]
    if source < rank:  # its early chunk precedes both of ours, its late one follows both
        return [(both, early, False)]
    return [(late, both, False)]  # its chunks both precede our late chunk, follow our early one


_FUSED_DTYPES = (torch.float32, torch.float64)  # the accumulation dtypes the kernel takes


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype scores, softmax statistics and gradients are accumulated in: fp32 (fp64 inputs
    stay fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, rows, cols), accumulation dtype
    if causal:  # a diagonal block: the same chunk of positions on both sides
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu_(1), float("-inf"))
    return s


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's partial output and log-sum-exp per row, ``(O_b, lse_b)``. On CPU PyTorch's
    fused attention kernel (the one ``scaled_dot_product_attention`` runs there; it returns the
    log-sum-exp too); elsewhere :func:`explicit_block_forward`."""
    if q.device.type == "cpu" and q.dtype in _FUSED_DTYPES:
        o_b, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return o_b, lse_b
    return explicit_block_forward(q, k, v, causal, scale)


def explicit_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_block_forward` from explicit scores (the module docstring's formulas)."""
    sc = _scores(q, k, scale, causal)
    lse_b = torch.logsumexp(sc, dim=-1)
    return torch.matmul(torch.exp(sc - lse_b.unsqueeze(-1)), v), lse_b


def _block_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's ``(dQ, dK, dV)`` from the rows' final ``out`` and ``lse`` (FlashAttention-2's
    backward). On CPU the fused kernel's backward, which takes them as given (it recomputes
    ``P = exp(S - lse)`` and ``D = rowsum(dO * O)`` from them); elsewhere
    :func:`explicit_block_backward`."""
    if q.device.type == "cpu" and q.dtype in _FUSED_DTYPES:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
        return dq, dk, dv
    return explicit_block_backward(do, q, k, v, out, lse, causal, scale)


def explicit_block_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, causal: bool, scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_block_backward` in explicit steps (the module docstring's formulas)."""
    p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * out).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    return dq, torch.matmul(ds.transpose(-1, -2), q) * scale, torch.matmul(p.transpose(-1, -2), do)


def _ring(kind: str, tensor: torch.Tensor, group: Group) -> tuple[torch.Tensor, Handle | None]:
    """Post the send of ``tensor`` to the next rank and the receive of its like from the previous
    one; returns the receive buffer and the handle to wait for."""
    buf = torch.empty_like(tensor)
    n, r = group.size, group.rank
    ops = [P2P("send", tensor, (r + 1) % n), P2P("recv", buf, (r - 1) % n)]
    return buf, comm.batch_p2p(ops, group, async_op=True, tag=f"ring_{kind}")


class _RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over every cp rank's keys and values.

    q, k, v: (B, h, 2c, d), this rank's two chunks; returns (B, h, 2c, d). Forward: the K/V ring
    with the online softmax; backward: the K/V ring again with dK/dV riding along (module
    docstring)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group) -> torch.Tensor:
        n, r = group.size, group.rank
        c, scale = q.shape[2] // 2, q.shape[-1] ** -0.5
        acc = _acc(q)
        qf = q.to(acc)
        # (B, h, 2c, d) over a (B, 2c, h, d) storage, as scaled_dot_product_attention's output:
        # the block's transpose back to (B, 2c, h d) is then a view, not a copy of it that the
        # output projection would save for backward (one (B, T/n, H) tensor per layer more)
        B, heads, rows2, d = q.shape
        out = torch.zeros((B, rows2, heads, d), dtype=acc, device=q.device).transpose(1, 2)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # one message: (2, B, h, 2c, d)
        for s in range(n):
            nxt, handle = _ring("kv", kv, group) if s < n - 1 else (None, None)
            for rows, cols, causal in ring_blocks(r, (r - s) % n, c):
                o_b, lse_b = _block_forward(qf[:, :, rows], kv[0][:, :, cols].to(acc), kv[1][:, :, cols].to(acc),
                                            causal, scale)
                lse_r, out_r = lse[:, :, rows], out[:, :, rows]
                new = torch.logaddexp(lse_r, lse_b)
                out_r.mul_(torch.exp(lse_r - new).unsqueeze(-1)).add_(o_b * torch.exp(lse_b - new).unsqueeze(-1))
                lse_r.copy_(new)
            if handle is not None:
                handle.wait()
                kv = nxt
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        n, r = group.size, group.rank
        c, scale = q.shape[2] // 2, q.shape[-1] ** -0.5
        acc = _acc(q)
        qf, do = q.to(acc), grad_out.to(acc)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v]).contiguous()
        incoming: tuple[torch.Tensor, Handle | None] | None = None  # dK/dV of the K/V we hold
        for s in range(n):
            nxt, handle = _ring("kv", kv, group) if s < n - 1 else (None, None)
            part = torch.zeros(kv.shape, dtype=acc, device=q.device)  # (2, B, h, 2c, d)
            for rows, cols, causal in ring_blocks(r, (r - s) % n, c):
                dq_b, dk_b, dv_b = _block_backward(do[:, :, rows], qf[:, :, rows], kv[0][:, :, cols].to(acc),
                                                   kv[1][:, :, cols].to(acc), out[:, :, rows], lse[:, :, rows],
                                                   causal, scale)
                dq[:, :, rows] += dq_b
                part[0][:, :, cols] += dk_b
                part[1][:, :, cols] += dv_b
            if incoming is not None:  # the shares of the ranks that held these K/V before us
                buf, h = incoming
                if h is not None:
                    h.wait()
                part += buf
            incoming = _ring("dkv", part, group)  # on to the next holder; the last hop: home
            if handle is not None:
                handle.wait()
                kv = nxt
        buf, h = incoming
        if h is not None:
            h.wait()
        return dq.to(q.dtype), buf[0].to(k.dtype), buf[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Group) -> torch.Tensor:
    """Causal attention over the whole sequence for this cp rank's queries: q, k, v (B, h, T/n, d)
    of its two chunks -> (B, h, T/n, d). On a group of one, plain causal attention. Under
    autocast the blocks still accumulate in fp32 (autocast would round each matmul to 16 bits);
    the K/V travel in the inputs' dtype."""
    if group.size == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast(q.device.type, enabled=False):
        return _RingAttention.apply(q, k, v, group)


class ContextParallelPositions(nn.Module):
    """The position embedding of a cp rank: given its ``T/n`` local positions, the rows of their
    global positions (:func:`chunk_positions`), (T/n, H) -- under sequence parallelism only this
    tp rank's slice of them, (T/(n tp), H). The weight is the reference's (gradient: partial over
    the local tokens, averaged over dp x cp like every replicated parameter's)."""

    def __init__(self, wpe: nn.Module, group: Group) -> None:
        super().__init__()
        self.weight = wpe.weight
        self.group = group
        self.sp_group = wpe.group if isinstance(wpe, SequenceParallelPositions) else None

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        pos = chunk_positions(pos.numel(), self.group.rank, self.group.size, pos.device)
        if self.sp_group is not None:
            pos = pos.chunk(self.sp_group.size)[self.sp_group.rank]
        return F.embedding(pos, self.weight)


def context_parallel(model: nn.Module, group: Group) -> nn.Module:
    """Apply context parallelism over ``group`` to the (possibly tensor-parallel) reference GPT in
    place: ring attention in every block, global positions. Parameters are untouched (cp shards
    none of them); the inputs are split by :func:`split_sequence` in the step."""
    if group.size == 1:
        return model
    for block in model.blocks:
        block.attn.attend = functools.partial(ring_attention, group=group)
    model.wpe = ContextParallelPositions(model.wpe, group)
    return model
