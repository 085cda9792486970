"""The planner's context parallelism (plan/context.py): memory, ring bytes, compute, the search."""

from __future__ import annotations

import pytest

from paratrain.config import Layout
from paratrain.core.traffic import cp_comm_per_step
from paratrain.models.configs import ModelConfig, get_model_config
from paratrain.plan.context import score_fraction
from paratrain.plan.cost import estimate
from paratrain.plan.hardware import get_hardware
from paratrain.plan.search import enumerate_layouts, search

H100 = get_hardware("H100-80GB")
LONG = ModelConfig("long", num_layers=24, hidden=2048, num_heads=16, vocab_size=51200, max_seq_len=32768)


def test_activations_fall_by_cp_and_scores_by_the_ring_share():
    one, two, four = (estimate(LONG, Layout(cp=c), H100, 4, 32768) for c in (1, 2, 4))
    assert two.activation_bytes_per_device == pytest.approx(one.activation_bytes_per_device / 2)
    assert four.activation_bytes_per_device == pytest.approx(one.activation_bytes_per_device / 4)
    assert two.state == one.state  # cp shards no parameter
    assert score_fraction(1) == 1 and score_fraction(2) == 5 / 8 and score_fraction(4) == 9 / 32
    # every rank computes 1/cp of the per-token work and a little more than 1/cp of the scores
    # (the ring's diagonal step): a little more than half of one device's compute at cp 2
    assert 0.5 * one.time.compute < two.time.compute < 0.6 * one.time.compute


def test_ring_bytes_are_the_runtime_formula():
    e = estimate(LONG, Layout(cp=4, tp=2), H100, 8, 32768, precision="fp32")
    sent = sum(b for op, (_, b) in cp_comm_per_step(LONG, 4, 2, 8, 32768).items() if op.endswith("_send"))
    assert e.comm_bytes_per_device.cp == pytest.approx(sent)
    assert e.time.cp_comm > 0 and e.step_time_s == pytest.approx(e.time.total)
    assert "cp" not in estimate(LONG, Layout(tp=2), H100, 8, 32768).comm_bytes_per_device.as_dict()


def test_the_search_has_cp_within_a_node_and_pins_it():
    model = get_model_config("tiny")
    space = list(enumerate_layouts(model, 8, 8, 64, devices_per_node=4))
    assert {x.cp for x in space} == {1, 2, 4} and all(x.cp * x.tp <= 4 for x in space)
    for x in space:
        x.validate(model, 8, 64)
    best = search(LONG, 8, H100, 8, 32768, fixed={"cp": 2}, top=3).best
    assert best.layout.cp == 2 and best.fits


def test_the_search_bound_holds_for_cp_layouts():
    from paratrain.plan.bound import layout_context, step_time_lower_bound
    from paratrain.plan.cost import _estimate
    from paratrain.plan.options import CostOptions

    cpu = get_hardware("cpu")
    for hw in (H100, cpu):
        for layout in (Layout(cp=2), Layout(cp=4, tp=2, zero=1, dp=2), Layout(cp=2, pp=2, microbatches=4)):
            ctx = layout_context(LONG, layout, hw, 16, 32768, "bf16", CostOptions())
            full = _estimate(LONG, layout, hw, 16, 32768, "bf16", CostOptions())
            assert step_time_lower_bound(ctx) <= full.step_time_s, (hw.name, layout)
            assert ctx.peak_bytes() == pytest.approx(full.peak_bytes_per_device)
