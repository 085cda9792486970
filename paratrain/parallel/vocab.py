"""The vocabulary split over tensor-parallel ranks: embedding and cross-entropy.

Rank r of n owns vocabulary rows ``[r V'/n, (r+1) V'/n)`` of the token embedding ``W`` (V', H),
where ``V' = padded_vocab_size(V, n)`` is V itself when n divides it and otherwise V rounded up
to a multiple of 64 n. The padding rows ``[V, V')`` (on the last rank or ranks) are zero. With the
LM head tied to the embedding, the head's output columns are the same rows, so the logits come
out split along the vocabulary, (B, T, V'/n) per rank, and the loss is computed on them where
they are: the full (B, T, V) logits never exist on any rank.

Padding is invisible to the model's function: no token id is >= V, so the embedding never looks
a padding row up; the cross-entropy leaves the padding columns out of the max and the sum of
exponentials (as if they were ``-inf``), so the loss is the reference's and the padding logits'
gradient is exactly 0. Hence the padding rows' gradients are exactly 0 (embedding: never looked up; head:
``dW_j = sum_i dz_ij h_i`` with ``dz_ij = 0``) and AdamW (``m = v = 0``, decay of 0) never
moves them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paratrain import comm
from paratrain.comm import Group
from paratrain.config import padded_vocab_size
from paratrain.parallel.shard import shard_parameter
from paratrain.parallel.tp_ops import leave_tp

IGNORE_INDEX = -100  # as torch.nn.functional.cross_entropy


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tp.

    ``E(idx) = sum_r E_r(idx)`` where ``E_r(idx) = W_r[idx - start_r]`` if ``idx`` is one of rank
    r's rows and 0 otherwise: exactly one rank contributes each token. Forward: local lookup,
    then the sum over ranks (g, an all-reduce, giving (B, T, H) on every rank — or, under
    sequence parallelism, a reduce-scatter giving this rank's (B, T/n, H) slice). Backward:
    identity (or all-gather); each rank's weight gradient only touches its own rows.
    ``vocab_size`` is the real V; rows from V on are padding (never looked up: every id is < V).
    """

    def __init__(self, weight: nn.Parameter, group: Group, vocab_size: int,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.weight = weight  # (V'/n, H), V' = padded_vocab_size(V, n)
        self.group = group
        self.vocab_size = vocab_size
        self.sequence_parallel = sequence_parallel
        self.vocab_start = group.rank * weight.shape[0]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group: Group, sequence_parallel: bool = False) -> VocabParallelEmbedding:
        """This rank's rows of the reference embedding, the vocabulary padded for ``group``."""
        vocab = emb.num_embeddings
        weight = shard_parameter(emb.weight, group, dim=0, padded_size=padded_vocab_size(vocab, group.size))
        return cls(weight, group, vocab, sequence_parallel)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H), or (B, T/n, H) under sequence parallelism."""
        outside = (idx < self.vocab_start) | (idx >= self.vocab_start + self.weight.shape[0])
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp(partial, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        v, h = self.weight.shape
        return f"rows [{self.vocab_start}, {self.vocab_start + v}) of {self.vocab_size} x {h}, tp={self.group.size}"


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of logits split along the vocabulary.

    For token i with target t and logits z (all V of them, spread over ranks)::

        loss_i = log sum_j exp(z_j) - z_t = log sum_j exp(z_j - m) - (z_t - m),   m = max_j z_j

    Forward: ``m`` is the all-reduce (max) of each rank's local maximum; ``z_t - m`` is nonzero
    on the one rank owning t, and the local sums of ``exp(z_j - m)`` add up to the full sum, so
    both come from one all-reduce (sum) of a (2, N) tensor. ``m`` only keeps ``exp`` in range:
    it cancels, so it is treated as a constant. Tokens whose target is ``IGNORE_INDEX`` get
    loss 0 (and gradient 0).

    Padding: the max and the sum run over the real vocabulary ``j < V`` only, as if columns
    ``j >= V`` were ``-inf``: they are left out of the local max (a rank holding only padding
    has local max ``-inf``; the global max is finite) and their exponentials are set to 0, so
    they add nothing to the sum. The unpadded case is the same code with nothing to leave out.

    Backward: ``d loss_i / d z_j = softmax(z)_j - [j == t]``, computed from the local
    ``exp(z_j - m)`` and the global sum; no communication. On padding columns it is exactly 0.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                vocab_size: int, group: Group) -> torch.Tensor:
        """logits (N, V'/n) fp32, targets (N,) -> loss (N,)."""
        n_local = logits.shape[-1]
        n_real = min(max(vocab_size - vocab_start, 0), n_local)  # this rank's columns j < V
        # (N,): the local maximum over the real columns (-inf on a rank of padding only), then
        # the global one
        m = logits[:, :n_real].max(dim=-1).values if n_real else logits.new_full(logits.shape[:1], float("-inf"))
        comm.all_reduce(m, group, op="max")
        mine = (targets >= vocab_start) & (targets < vocab_start + n_local)
        local_t = (targets - vocab_start).masked_fill(~mine, 0)
        target_logit = (logits.gather(1, local_t.unsqueeze(1)).squeeze(1) - m) * mine
        exp = (logits - m.unsqueeze(-1)).exp_()  # (N, V'/n)
        exp[:, n_real:] = 0.0  # padding: exp(-inf) -- out of the sum, and softmax 0 there
        stats = torch.stack([exp.sum(dim=-1), target_logit])  # (2, N): one all-reduce for both
        comm.all_reduce(stats, group)
        sum_exp, target_logit = stats[0], stats[1]
        valid = targets != IGNORE_INDEX
        loss = (sum_exp.log() - target_logit) * valid
        exp.div_(sum_exp.unsqueeze(-1))  # now softmax over the full vocabulary, local columns
        ctx.save_for_backward(exp, local_t, mine, valid)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_t, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, local_t.unsqueeze(1), -mine.to(grad.dtype).unsqueeze(1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group: Group, vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose target is not ``IGNORE_INDEX``, like
    ``F.cross_entropy(full_logits[..., :V], targets, ignore_index=-100)`` (NaN when every target
    is ignored, as there). ``logits`` (..., V'/n) are this rank's vocabulary columns, starting
    at global column ``vocab_start``; ``targets`` (...) the same on every tp rank. Columns from
    ``vocab_size`` (V) on are padding, left out of the loss; None: no padding."""
    vocab = vocab_start + logits.shape[-1] if vocab_size is None else vocab_size
    loss = _VocabParallelCE.apply(logits.flatten(0, -2).float(), targets.flatten(), vocab_start, vocab, group)
    return loss.sum() / (targets != IGNORE_INDEX).sum()


class VocabParallelCrossEntropy(nn.Module):
    """Drop-in for the reference ``CrossEntropy`` taking vocab-split logits (B, T, V'/n), of
    which global columns ``vocab_size`` (V) on are padding."""

    def __init__(self, group: Group, vocab_start: int, vocab_size: int) -> None:
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.group, self.vocab_size)
