"""Measured per-rank memory (exact model-state bytes + saved-activation peak) = the planner's."""

from __future__ import annotations

import pytest
import torch

from paratrain.core.state import ModelState
from paratrain.plan.hardware import get_hardware
from paratrain.plan.local import predict_run
from tests.common import BASE, with_layout
from tests.harness import run_ranks

CFG = BASE.replace(seq_len=64, steps=2)
CASES = {
    "dp2-mb2": dict(dp=2, microbatches=2),
    "tp2": dict(tp=2),
    "tp2-sp-selective": dict(tp=2, sequence_parallel=True, recompute="selective"),
    "pp2-1f1b": dict(pp=2, microbatches=4, schedule="1f1b"),
    # ring attention keeps its output in SDPA's layout, so the projection's input is a view of
    # it (when it was a copy, each layer kept one (B, T/cp, H) fp32 tensor more: -3.4% on small)
    "cp2": dict(cp=2),
    # ZeRO: sharded states; ZeRO-3's gathered weights, saved by each linear, are parameters
    "dp2-zero2-mb2": dict(dp=2, zero=2, microbatches=2),
    "dp2-zero3": dict(dp=2, zero=3),
    "pp2-gpipe-full": dict(pp=2, microbatches=4, schedule="gpipe", recompute="full"),
    # small's 6 layers make chunks of 1, 2, 2, 1 layers: which chunks are in flight matters
    "pp2-interleaved-small": dict(pp=2, microbatches=2, schedule="interleaved", virtual_stages=2),
    # zero-bubble: an I keeps each linear's input and output gradient for its W (split.py), held
    # outside autograd's saved tensors and counted through memory.hold; rank 1 of ZB-H1 holds one
    # micro-batch whole and one only for its W (tiny: 4 layers, 2 per stage; ZB-V: 1 per chunk)
    "pp2-zb-h1": dict(pp=2, microbatches=4, schedule="zb-h1"),
    "pp2-zb-v": dict(pp=2, microbatches=4, schedule="zb-v"),
    # a mixture of experts: E / ep experts per rank, whole on both tp ranks (dropless: the planner's rows)
    "ep2-tp2-moe": dict(dp=2, ep=2, tp=2),
    "dp4-ep2-zero2-moe": dict(dp=4, ep=2, zero=2),  # experts' states sharded over dp / ep = 2, the rest over 4
    "dp4-ep2-zero3-moe": dict(dp=4, ep=2, zero=3),
}


def measure_fn(cfg):
    from paratrain.launch import RankEnv
    from paratrain.parallel.memory import ActivationMeter
    from paratrain.train import setup, train_step

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    train_step(s, 1)
    s.count_states = True  # the states at the optimizer (ZeRO 2/3 release gradients at zero_grad)
    with ActivationMeter(s.pm.weight_tensors()) as meter:  # as `train --measure-memory` does
        train_step(s, 2)
    return s.states, meter.peak_bytes


@pytest.mark.parametrize("name", list(CASES))
def test_measured_memory_is_the_planners(name):
    """Model states agree to AdamW's 0-d step counters (4 bytes per tensor); activations to the
    LayerNorm statistics and index tensors the planner leaves out (0.2-0.5% here, measured)."""
    base = CFG.replace(model="small") if name.endswith("-small") else \
        CFG.replace(model="tiny-moe", capacity_factor=0.0) if name.endswith("-moe") else CFG
    cfg = with_layout(base, **CASES[name])
    measured = run_ranks(cfg.layout.world_size, measure_fn, cfg)
    predicted = predict_run(cfg, get_hardware("cpu")).memory_per_rank
    for rank, ((got, acts), want) in enumerate(zip(measured, predicted, strict=True)):
        state = ModelState.from_dict(want)  # the planner's prediction, the runtime's record
        gap = got - state
        # ZeRO pads each bucket / unit to a multiple of dp elements: at most dp - 1 fp32 per unit
        pad = 4 * (cfg.layout.dp - 1) * (cfg.model_config().num_layers + 1) if cfg.layout.zero else 0
        assert 0 <= gap.params <= pad and 0 <= gap.grads <= pad, f"rank {rank}: {got} {state}"
        assert got.optimizer == pytest.approx(state.optimizer, rel=1e-3), f"rank {rank}"
        if name.endswith("-moe"):  # below: the rows an ep rank receives depend on the routing
            continue
        # zero-bubble: +1.75-1.83% measured here (tiny): while an I runs, the output gradients it
        # queues for W are alive next to the saved tensors autograd has not freed yet; the
        # planner counts what is held between I and W. Before memory.hold counted the queue at
        # all, ZB-H1's rank 1 measured 28% under the planner (small: 62.7 vs 87.7 MiB).
        rel = 0.025 if CASES[name].get("schedule", "").startswith("zb") else 0.01
        assert acts == pytest.approx(want["activations"], rel=rel), f"rank {rank}: {acts} {want}"
    if name.endswith("-moe"):
        # An ep rank's experts keep the rows routed to them: +-4% of a balanced share on these 2
        # steps (measured); over the ep group the rows are every token's k, whatever the routing,
        # so the mean is the planner's (balanced) figure, to the LayerNorm statistics as above.
        mean = sum(acts for _, acts in measured) / len(measured)
        assert mean == pytest.approx(predicted[0]["activations"], rel=0.01), (mean, predicted[0])
        assert all(abs(acts / predicted[0]["activations"] - 1) < 0.1 for _, acts in measured), measured
