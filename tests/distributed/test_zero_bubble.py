"""Zero-bubble pipeline schedules (ZB-H1, ZB-V: the backward split into I and W) reproduce the
single-process reference, alone and with data and tensor parallelism.

Several layouts run inside one ``run_ranks`` call (one process launch per world size) to keep
the suite's time. Tolerances: tests/common.py. The split backward computes the reference's
gradients as the same matmuls (``dL/dW = dy^T x`` of each micro-batch, later): only the order of
the per-micro-batch sums changes, as in any pipeline. A W that is never run, run twice, or an
input gradient that misses a linear's part moves the norms by far more than NORM_RTOL (checked
by breaking ``WeightGrads.run`` on purpose).
"""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.core.schedules import placement_of
from paratrain.core.traffic import pp_send_bytes_per_step
from paratrain.reference import reference_train
from tests.common import BASE, assert_matches_reference, param_atol, train_ranks_fn, with_layout
from tests.harness import run_ranks

DEEP = BASE.replace(model="tiny-deep")  # 8 blocks: pp 4 x 2 chunks of ZB-V
SHORT = BASE.replace(steps=3)  # the 8-process case: 3 steps keep it affordable

WORLDS = {
    # pp 4 alone (ZB-V: 8 chunks); pp 2 with data parallelism (buckets reduced after the last W)
    # and with ZeRO-2 (each bucket reduced once per micro-batch, when its I and W are both in)
    4: [(DEEP, dict(pp=4, microbatches=4, schedule="zb-v")),
        (BASE, dict(dp=2, pp=2, microbatches=2, schedule="zb-h1")),
        (BASE, dict(dp=2, pp=2, zero=2, microbatches=2, schedule="zb-v"))],
    # 3D: tp collectives inside I (input gradients), none in W
    8: [(SHORT, dict(dp=2, pp=2, tp=2, microbatches=2, schedule="zb-v"))],
}


@functools.cache
def reference(cfg):
    return reference_train(cfg)


def _train_each(cfgs):
    return [train_ranks_fn(cfg) for cfg in cfgs]


@pytest.mark.equivalence
@pytest.mark.parametrize("world", list(WORLDS))
def test_zero_bubble_matches_reference(world):
    cases = WORLDS[world]
    cfgs = [with_layout(base, **layout) for base, layout in cases]
    results = run_ranks(world, _train_each, cfgs, timeout=240)
    for i, ((base, _), cfg) in enumerate(zip(cases, cfgs)):
        ref, name = reference(base), str(cfg.layout)
        assert max(ref.grad_norms) > base.grad_clip  # clipping was active
        for rank in range(world):
            assert_matches_reference(results[rank][i], ref, cfg, state=None, who=f"{name}, rank {rank}")
        assert_matches_reference(results[0][i], ref, cfg, state="full_state", who=f"{name}, gathered")
        L = cfg.layout
        p, v = L.pp, L.virtual_stages
        for rank in range(world):
            res = results[rank][i]
            if L.tp == 1:  # each stage: the reference's tensors under their names
                for k, t in res["state"].items():
                    assert torch.allclose(t, ref.state[k], rtol=0, atol=param_atol(cfg)), f"{name}: {k}"
            pipe = rank // (L.dp * L.tp)
            expected = pp_send_bytes_per_step(cfg.model_config(), p, v, pipe, cfg.global_batch // L.dp,
                                              cfg.seq_len, L.tp, L.sequence_parallel,
                                              placement=placement_of(L.schedule))
            assert res["ops"]["pp"]["send"]["bytes"] == cfg.steps * expected, f"{name}, rank {rank}"
            if L.zero == 2:  # each bucket reduce-scattered once per micro-batch over I and W (zero.py),
                # the planner's m S: reducing at every I and every W sent 2 m S (fails so)
                rs = res["ops"]["dp"]["reduce_scatter"]
                assert rs["bytes"] == cfg.steps * L.microbatches * res["dp_bucket_bytes"], f"{name}, rank {rank}"
        for spans in results[0][i]["timeline"]["ranks"]:  # F, I and W once per micro-batch chunk
            kinds = sorted(a["kind"] for a in spans if a["kind"] in "FBIW")
            assert kinds == sorted("FIW" * (L.microbatches * v))
            computes = [a for a in spans if a["kind"] in "FIW"]
            assert all(a["start"] <= a["end"] <= b["start"] for a, b in zip(computes, computes[1:]))
