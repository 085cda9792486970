"""The bounded search (``search(top=k)``, what ``paratrain plan`` runs) against the exhaustive one:
the same top k in the same order, the same counts, misfit and pure data-parallel layout; and the
two cheap numbers it relies on, the exact peak memory and the lower bound on the step time."""

from __future__ import annotations

import dataclasses

import pytest

from paratrain.config import runtime_implements
from paratrain.models.configs import ModelConfig, get_model_config
from paratrain.plan.bound import family_lower_bound, layout_context, step_time_lower_bound
from paratrain.plan.cost import CostOptions, _estimate
from paratrain.plan.hardware import get_hardware
from paratrain.plan.screen import MemoryScreen
from paratrain.plan.search import _blocks, enumerate_layouts, search

H100, A100, CPU = get_hardware("H100-80GB"), get_hardware("A100-80GB"), get_hardware("cpu").replace(cores_per_node=2)
M13 = ModelConfig("m13", num_layers=40, hidden=5120, num_heads=40, vocab_size=51200, max_seq_len=2048)

CASES = {  # name: (model, devices, hardware, batch, seq_len, search keywords)
    "gpt2-1.3b on 64 H100": (get_model_config("gpt2-1.3b"), 64, H100, 512, 1024, {}),
    "small on 8 shared cores": (get_model_config("small"), 8, CPU, 32, 256, {}),
    "13B on 16 GiB devices": (M13, 32, H100.replace(memory_bytes=16 * 2**30), 64, 2048, {}),
    "pinned tp, runtime only": (get_model_config("gpt2-350m"), 16, A100, 64, 1024,
                                {"fixed": {"tp": 2}, "keep": runtime_implements}),
    "no overlap, fixed bubble": (get_model_config("gpt2-350m"), 16, A100, 64, 1024,
                                 {"options": CostOptions(overlap_dp=False, bubble_fraction=0.2)}),
    "nothing fits": (get_model_config("gpt2-1.3b"), 4, H100.replace(memory_bytes=4 * 2**30), 8, 1024, {}),
    "offload, fp32 gradients": (get_model_config("gpt2-350m"), 4, A100, 16, 1024,
                                {"options": CostOptions(offload_optimizer=True, grad_bytes=4)}),
}


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a == b)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("top", [2, 10])
def test_bounded_search_ranks_as_the_exhaustive_one(name: str, top: int) -> None:
    model, n, hw, batch, seq_len, kw = CASES[name]
    full = search(model, n, hw, batch, seq_len, **kw)
    fast = search(model, n, hw, batch, seq_len, top=top, **kw)
    assert fast.ranked == full.ranked[:top]  # the same Estimates, in the same order
    assert fast.fitting == full.fitting == len(full.ranked) and fast.considered == full.considered
    assert _same(fast.smallest_unfit, full.smallest_unfit) and _same(fast.best_pure_dp, full.best_pure_dp)
    if full.ranked:
        assert fast.explain() == full.explain()


@pytest.mark.parametrize("name", [c for c in CASES if c != "gpt2-1.3b on 64 H100"])  # the others cover it faster
def test_peak_memory_is_the_estimates_and_the_bound_holds(name: str) -> None:
    """For every layout of the space: the screening context's peak and the memory screen's (from
    memoized pieces, every ZeRO stage at once) are exactly the estimate's (the count of fitting
    layouts depends on it), and the step-time bounds are never above the estimate (else the
    bounded search could drop a winner): the layout's own, from one context per ZeRO stages
    (at zero 0) as the search does, and its family's (any micro-batch count, and at its count),
    taken over the layout's own sp and ZeRO stage: the family's is the least of those."""
    model, n, hw, batch, seq_len, kw = CASES[name]
    options = kw.get("options", CostOptions())
    screen = MemoryScreen(model, hw, batch, seq_len, "bf16", options, (0, 1, 2, 3))
    tight = 0
    for layout in enumerate_layouts(model, n, batch, seq_len, hw.devices_per_node, kw.get("fixed")):
        est = _estimate(model, layout, hw, batch, seq_len, "bf16", options)
        assert screen.peaks((layout,))[0][layout.zero] == est.peak_bytes_per_device, layout
        base = layout_context(model, dataclasses.replace(layout, zero=0), hw, batch, seq_len, "bf16", options)
        for ctx, zero in ((layout_context(model, layout, hw, batch, seq_len, "bf16", options), None),
                          (base, layout.zero)):
            assert ctx.peak_bytes(zero) == est.peak_bytes_per_device, layout
            bound = step_time_lower_bound(ctx, zero)
            assert 0 < bound <= est.step_time_s, layout
        tight += bound > 0.9 * est.step_time_s
        for m in (None, layout.microbatches):
            family = family_lower_bound(model, layout, hw, batch, seq_len, "bf16", options,
                                        (layout.sequence_parallel,), (layout.zero,), m)
            assert 0 < family <= est.step_time_s, (layout, m)
    assert tight  # a bound that prunes: within 10% of the estimate for some layouts
    for valid, _ in _blocks(model, n, batch, seq_len, hw.devices_per_node, kw.get("fixed"), False):
        # a block's bound (its largest activation pieces) holds every candidate's peak: a block under
        # the capacity is counted as fitting whole
        assert all(u >= max(col) for u, col in zip(screen.upper(valid), zip(*screen.peaks(valid)))), valid[0]


def test_interleaved_stash_terms_are_the_stash_peak() -> None:
    """The screening's interleaved stash (integer terms, micro-batch counts past the steady state
    folded onto one period) is topology.peak_stash's sum over the chunks' bytes."""
    from paratrain.config import Layout
    from paratrain.plan.footprint import LayoutMemory
    from paratrain.plan.topology import peak_stash

    model = get_model_config("gpt2-1.3b")
    for pp, v, m in [(2, 5, 2), (2, 5, 64), (4, 3, 4), (4, 3, 32), (3, 7, 9), (8, 3, 64)]:
        mem = LayoutMemory(model, Layout(dp=1, pp=pp, microbatches=m, schedule="interleaved", virtual_stages=v),
                           m, 1024, "bf16", CostOptions())
        last = pp * v - 1
        for i in range(pp):
            per_chunk = tuple(mem.shape.chunks[k] * mem.act_layer + (mem.emb_act if k == 0 else 0)
                              + (mem.out_act if k == last else 0) for k in range(i, pp * v, pp))
            want = peak_stash("interleaved", pp, m, v, i, per_chunk)
            assert mem.rank_memory(i).activation_bytes == pytest.approx(want, rel=1e-12), (pp, v, m, i)
