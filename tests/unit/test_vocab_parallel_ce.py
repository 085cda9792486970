"""The vocab-parallel cross-entropy equals ``F.cross_entropy`` on the full logits — values and
gradients, with ignored positions — on 1, 2 and 4 ranks, and never needs the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paratrain.comm import single_group
from paratrain.parallel.vocab import IGNORE_INDEX, vocab_parallel_cross_entropy
from tests.harness import run_ranks

N, V = 24, 32
# fp32: the reference's log-softmax and ours (max, then a sum of exponentials per shard added by
# an all-reduce) differ by rounding only, ~1e-7 relative.
RTOL, ATOL = 1e-5, 1e-7


def problem(scale: float = 3.0, seed: int = 0):
    """Logits (2, N/2, V) — a batch of sequences — and targets with ignored positions,
    including a sequence whose first half is all ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, N // 2, V, generator=g) * scale
    targets = torch.randint(0, V, (2, N // 2), generator=g)
    targets[0, :5] = IGNORE_INDEX
    targets[1, 3] = IGNORE_INDEX
    return logits, targets


def reference(logits, targets):
    full = logits.clone().requires_grad_()
    loss = F.cross_entropy(full.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), full.grad


def ours(logits, targets, group, rank, n):
    """Our loss and the gradient of this rank's vocabulary columns."""
    width = logits.shape[-1] // n
    local = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, rank * width, group)
    loss.backward()
    return loss.detach(), local.grad


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
