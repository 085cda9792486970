"""The vocab-parallel cross-entropy equals ``F.cross_entropy`` on the full logits — values and
gradients, with ignored positions — on 1, 2 and 4 ranks, and never needs the full logits. With a
padded vocabulary it equals ``F.cross_entropy`` on the real columns only, and the padding
columns' gradients are exactly zero."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paratrain.comm import single_group
from paratrain.config import padded_vocab_size
from paratrain.parallel.vocab import IGNORE_INDEX, vocab_parallel_cross_entropy
from tests.harness import run_ranks

N, V = 24, 32
# fp32: the reference's log-softmax and ours (max, then a sum of exponentials per shard added by
# an all-reduce) differ by rounding only, ~1e-7 relative.
RTOL, ATOL = 1e-5, 1e-7


def problem(scale: float = 3.0, seed: int = 0, vocab: int = V):
    """Logits (2, N/2, V) — a batch of sequences — and targets with ignored positions,
    including a sequence whose first half is all ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, N // 2, vocab, generator=g) * scale
    targets = torch.randint(0, vocab, (2, N // 2), generator=g)
    targets[0, :5] = IGNORE_INDEX
    targets[1, 3] = IGNORE_INDEX
    return logits, targets


def reference(logits, targets):
    full = logits.clone().requires_grad_()
    loss = F.cross_entropy(full.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), full.grad


def ours(logits, targets, group, rank, n, vocab_size=None):
    """Our loss and the gradient of this rank's vocabulary columns (of ``logits``' last
    dimension split n ways; columns from ``vocab_size`` on are padding)."""
    width = logits.shape[-1] // n
    local = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, rank * width, group, vocab_size)
    loss.backward()
    return loss.detach(), local.grad


# A vocabulary no n > 1 divides: padded (config.padded_vocab_size) to 128 columns on 2 ranks
# (rank 1: 37 real, 27 padding) and 256 on 4 (rank 1: 37 real; ranks 2 and 3: padding only).
VP = 101


def padded_problem(width: int, scale: float = 3.0):
    """``problem`` over VP real columns, then ``width - VP`` padding columns holding values far
    above every real logit: unmasked, they would dominate the max and the sum of exponentials."""
    logits, targets = problem(scale, vocab=VP)
    g = torch.Generator().manual_seed(1)
    pad = logits.abs().max() + 30.0 * torch.rand(*logits.shape[:-1], width - VP, generator=g)
    return torch.cat([logits, pad], dim=-1), targets


@pytest.mark.parametrize("scale", [3.0, 1e4], ids=["normal", "huge-logits"])
def test_one_rank_matches_cross_entropy(scale):
    """tp = 1, the same code path: every collective is a no-op. Logits of 1e4 overflow exp()
    unless the maximum is subtracted first."""
    logits, targets = problem(scale)
    ref_loss, ref_grad = reference(logits, targets)
    loss, grad = ours(logits, targets, single_group("tp"), 0, 1)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=ATOL)
    ignored = targets == IGNORE_INDEX
    assert torch.all(grad[ignored] == 0)


def test_all_ignored_is_nan_like_cross_entropy():
    logits, targets = problem()
    targets.fill_(IGNORE_INDEX)
    ref_loss, _ = reference(logits, targets)
    loss, grad = ours(logits, targets, single_group("tp"), 0, 1)
    assert torch.isnan(ref_loss) and torch.isnan(loss)


def ranks_fn(n: int, scale: float):
    import torch.distributed as dist

    from paratrain.comm import Group

    rank = dist.get_rank()
    group = Group("tp", list(range(n)), rank, dist.group.WORLD)
    logits, targets = problem(scale)
    loss, grad = ours(logits, targets, group, rank, n)
    return loss, grad, group.stats.as_dict()


def test_one_rank_with_padding_matches_cross_entropy_on_the_real_columns():
    logits, targets = padded_problem(128)
    ref_loss, ref_grad = reference(logits[..., :VP], targets)
    loss, grad = ours(logits, targets, single_group("tp"), 0, 1, vocab_size=VP)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(grad[..., :VP], ref_grad, rtol=RTOL, atol=ATOL)
    assert torch.count_nonzero(grad[..., VP:]) == 0
    assert torch.all(grad[targets == IGNORE_INDEX] == 0)


def padded_ranks_fn(n: int, scale: float):
    import torch.distributed as dist

    from paratrain.comm import Group

    rank = dist.get_rank()
    group = Group("tp", list(range(n)), rank, dist.group.WORLD)
    logits, targets = padded_problem(padded_vocab_size(VP, n), scale)
    loss, grad = ours(logits, targets, group, rank, n, vocab_size=VP)
    return loss, grad, group.stats.as_dict()


@pytest.mark.parametrize("n,scale", [(2, 3.0), (4, 1e4)], ids=["2-normal", "4-huge-logits"])
def test_vocab_parallel_with_padding_matches_cross_entropy(n, scale):
    """Ranks with some and with only padding columns; ignored positions; the same two
    all-reduces of 3 floats per token as without padding."""
    width = padded_vocab_size(VP, n)
    assert width == {2: 128, 4: 256}[n]
    logits, targets = padded_problem(width, scale)
    ref_loss, ref_grad = reference(logits[..., :VP], targets)
    grad_full = torch.cat([ref_grad, torch.zeros(*ref_grad.shape[:-1], width - VP)], dim=-1)
    local = width // n
    for rank, (loss, grad, stats) in enumerate(run_ranks(n, padded_ranks_fn, n, scale)):
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
        expected = grad_full[..., rank * local:(rank + 1) * local]
        torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)
        padding = grad[..., max(0, VP - rank * local):]
        assert torch.count_nonzero(padding) == 0, f"rank {rank}: padding columns got a gradient"
        assert torch.all(grad[targets == IGNORE_INDEX] == 0)
        assert (stats["all_reduce"]["calls"], stats["all_reduce"]["bytes"]) == (2, 3 * N * 4)


@pytest.mark.parametrize("n", [2, 4])
def test_vocab_parallel_matches_cross_entropy(n):
    logits, targets = problem(1e4 if n == 4 else 3.0)
    ref_loss, ref_grad = reference(logits, targets)
    results = run_ranks(n, ranks_fn, n, 1e4 if n == 4 else 3.0)
    width = V // n
    for rank, (loss, grad, stats) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
        torch.testing.assert_close(grad, ref_grad[..., rank * width:(rank + 1) * width], rtol=RTOL, atol=ATOL)
        # two all-reduces of N and 2N fp32 values, nothing of size V: the logits never travel
        assert stats == {"all_reduce": {"calls": 2, "bytes": 3 * N * 4,
                                        "wire_bytes": 2 * (n - 1) / n * 3 * N * 4,
                                        "seconds": stats["all_reduce"]["seconds"]}}
