"""Context parallelism's pure parts: the chunk assignment, the ring's blocks (exactly the causal
mask, the same work on every rank at every step), the layout rule, the traffic formula."""

from __future__ import annotations

import pytest
import torch

from paratrain.config import Layout, TrainConfig, runtime_implements
from paratrain.core.traffic import cp_comm_per_step, cp_traffic
from paratrain.errors import ConfigError
from paratrain.models.configs import get_model_config
from paratrain.parallel.context import chunk_positions, gather_sequence, ring_blocks, split_sequence

TINY = get_model_config("tiny")


class _Group:  # split_sequence reads only size and rank
    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank


def test_rank_i_holds_chunks_i_and_2n_minus_1_minus_i():
    assert chunk_positions(4, 0, 4).tolist() == [0, 1, 14, 15]
    assert chunk_positions(4, 3, 4).tolist() == [6, 7, 8, 9]
    x = torch.arange(2 * 16).view(2, 16)
    parts = [split_sequence(x, _Group(4, r)) for r in range(4)]
    assert parts[1].tolist() == [[2, 3, 12, 13], [18, 19, 28, 29]]
    assert torch.equal(gather_sequence(parts), x)
    assert split_sequence(x, _Group(1, 0)) is x


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_blocks_are_the_causal_mask_balanced(n):
    c = 3
    T = 2 * n * c
    for r in range(n):
        covered = torch.zeros(T, T, dtype=torch.int64)
        qpos = chunk_positions(2 * c, r, n)
        for s in range(n):
            j = (r - s) % n
            kpos = chunk_positions(2 * c, j, n)
            work = 0
            for rows, cols, causal in ring_blocks(r, j, c):
                qs, ks = qpos[rows], kpos[cols]
                allowed = qs[:, None] >= ks[None, :]
                if causal:
                    assert torch.equal(allowed, torch.ones_like(allowed).tril())
                else:
                    assert allowed.all()  # a full block is wholly inside the mask
                covered[qs[:, None], ks[None, :]] += allowed.long()
                work += allowed.numel()
            assert work == (3 * c * c if s == 0 else 2 * c * c)  # dense elements computed
        mine = covered[qpos]  # this rank's query rows: every key at or before the query, once
        assert torch.equal(mine, (qpos[:, None] >= torch.arange(T)[None, :]).long())


def test_layout_rule():
    Layout(cp=4).validate(TINY, 8, 32)
    with pytest.raises(ConfigError, match="seq_len must be divisible by 6; got seq_len=32"):
        Layout(cp=3).validate(TINY, 8, 32)
    with pytest.raises(ConfigError, match="splits each rank's seq_len / cp = 6 tokens over tp=4"):
        Layout(cp=2, tp=4, sequence_parallel=True).validate(TINY, 8, 12)
    with pytest.raises(ConfigError, match="does not implement dropout"):
        Layout(cp=2).validate(TINY.replace(dropout=0.1), 8, 32)
    TrainConfig(layout=Layout(dp=2, cp=2, zero=1), seq_len=32).validate()  # ZeRO shards over dp x cp
    assert runtime_implements(Layout(cp=2, zero=2)) and runtime_implements(Layout(cp=2, tp=2))
    assert Layout(dp=2, cp=2).world_size == 4 and str(Layout(cp=2)) == "dp=1 pp=1 tp=1 cp=2"
    assert str(Layout(dp=2)) == "dp=2 pp=1 tp=1"


def test_traffic_formula():
    assert cp_traffic(TINY, 1, 1, 4, 32) == {}
    # tiny: 4 blocks, h = 128; cp 4 over tp 2: K/V of 8 tokens x 64 wide x 4 sequences
    kv = 2 * 4 * 8 * 64 * 4
    got = cp_comm_per_step(TINY, 4, 2, local_batch=8, seq_len=32, microbatches=2)
    assert got["ring_kv_send"] == (2 * 2 * 3 * 4, 2 * 2 * 3 * 4 * kv)  # m x (fwd + bwd) x (N-1) x L
    assert got["ring_dkv_send"] == (2 * 4 * 4, 2 * 4 * 4 * kv)  # m x N x L, fp32 like the K/V here
    assert got["ring_kv_recv"] == got["ring_kv_send"]
    again = cp_comm_per_step(TINY, 4, 2, 8, 32, 2, recompute="selective")["ring_kv_send"]
    assert again == (3 * 2 * 3 * 4, 3 * 2 * 3 * 4 * kv)  # the replayed forward: one more K/V ring


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_block_kernel_equals_the_explicit_formulas(dtype, causal):
    """The CPU ring computes each block with PyTorch's fused attention kernel (forward: partial
    output and log-sum-exp; backward from the rows' *final* output and log-sum-exp, which a
    ring's earlier blocks changed). It must give what the module's explicit formulas give: a
    kernel that ignored the given ``out``/``lse`` (recomputing them from this block alone) or
    masked the wrong triangle differs here by O(1). Rows a strided slice of a larger tensor,
    as the ring passes them. Tolerance: 1e-5 relative in fp32 (different summation order over
    16 keys: measured 5e-7 absolute on O(1) values), 1e-12 in fp64."""
    from paratrain.parallel.context import (
        _block_backward,
        _block_forward,
        explicit_block_backward,
        explicit_block_forward,
    )

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 32, 8, dtype=dtype, generator=gen)[:, :, 8:24]
    k, v = (torch.randn(2, 4, 16, 8, dtype=dtype, generator=gen) for _ in range(2))
    scale, tol = 8 ** -0.5, (1e-5 if dtype == torch.float32 else 1e-12)
    fused, explicit = _block_forward(q, k, v, causal, scale), explicit_block_forward(q, k, v, causal, scale)
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # the rows' final statistics after merging with other blocks: not this block's own
    out = explicit[0] * 0.7 + 0.1 * torch.randn(explicit[0].shape, dtype=dtype, generator=gen)
    lse, do = explicit[1] + 0.3, torch.randn(out.shape, dtype=dtype, generator=gen)
    for a, b in zip(_block_backward(do, q, k, v, out, lse, causal, scale),
                    explicit_block_backward(do, q, k, v, out, lse, causal, scale)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
