"""Context parallelism (ring attention over the cp ranks, ``parallel/context.py``)."""

from __future__ import annotations

import torch

from tests.harness import run_ranks


def _ring_vs_sdpa(n: int) -> list[float]:
    """Runs on every rank: ring attention of this rank's chunks vs the whole-sequence causal SDPA
    (fp64), forward and the three input gradients; the largest |difference| of each."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from paratrain.mesh import Mesh, MeshShape
    from paratrain.parallel.context import ring_attention, split_sequence

    mesh = Mesh.build(MeshShape(cp=n), dist.get_rank())
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 8 * n, 8, generator=g, dtype=torch.float64) for _ in range(4))
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*whole, is_causal=True)
    ref.backward(grad)

    def local(t: torch.Tensor) -> torch.Tensor:  # (B, h, T, d) -> this rank's (B, h, T/n, d)
        return split_sequence(t.transpose(1, 2), mesh.cp).transpose(1, 2).contiguous()

    mine = [local(t).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, mesh.cp)
    out.backward(local(grad))
    return [(out - local(ref)).abs().max().item()] + [
        (a.grad - local(b.grad)).abs().max().item() for a, b in zip(mine, whole)]


def test_ring_attention_is_causal_attention_fp64():
    # fp64: any wrong block, mask, merge or gradient hop is O(1); rounding is ~1e-15.
    for n in (2, 4):
        for rank, errors in enumerate(run_ranks(n, _ring_vs_sdpa, n)):
            assert max(errors) < 1e-12, (n, rank, errors)
