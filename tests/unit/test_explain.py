"""`paratrain explain`: the ranks, groups, slices and bytes of one layout, from the planner's own
formulas; checked here against the per-step formulas the runtime's counters are tested with."""

from __future__ import annotations

import pytest

from paratrain.cli import main
from paratrain.config import Layout
from paratrain.core.traffic import tp_comm_per_step, zero_comm_per_step
from paratrain.models.configs import get_model_config, param_count
from paratrain.plan.explain import explain_text, rank_views

TINY = get_model_config("tiny")


def test_groups_layers_and_slices_of_dp2_tp2_pp2(capsys):
    assert main(["explain", "--dp", "2", "--tp", "2", "--pp", "2", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tp: [0, 1]  [2, 3]  [4, 5]  [6, 7]" in out
    assert "dp: [0, 2]  [1, 3]  [4, 6]  [5, 7]" in out and "pp: [0, 4]  [1, 5]  [2, 6]  [3, 7]" in out
    assert "rows [64:128] of each of q, k, v (heads 2-3 of 4)" in out and "columns [256:512] of (128, 512)" in out
    views = rank_views(TINY, Layout(dp=2, pp=2, tp=2), 32, 128)
    assert [(v.dp, v.pp, v.tp) for v in views[:3]] == [(0, 0, 0), (0, 0, 1), (1, 0, 0)]
    assert views[0].units == ("embedding", "blocks 0-1") and views[7].units == ("blocks 2-3", "final LayerNorm + head")


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_dp_bytes_are_the_runtime_formula(zero):
    layout = Layout(dp=2, zero=zero, microbatches=2)
    (v,) = [x for x in rank_views(TINY, layout, 8, 32) if x.rank == 0]
    assert v.params == param_count(TINY)  # one rank holds the whole model
    got: dict[str, tuple[int, int]] = {}
    for s in v.sends:
        key = "grad_norm" if s.payload == 4 else s.op
        c, b = got.get(key, (0, 0))
        got[key] = (c + s.calls, b + s.payload)
    assert got == zero_comm_per_step(zero, [4 * param_count(TINY)], microbatches=2)  # one bucket of 4 psi


@pytest.mark.parametrize("sp", [False, True])
def test_tp_bytes_are_the_runtime_formula(sp):
    layout = Layout(dp=2, tp=2, sequence_parallel=sp, microbatches=2)
    views = rank_views(TINY, layout, 8, 32)
    want = tp_comm_per_step(TINY, 2, sp, 4, 32, microbatches=2)
    want_total = sum(b for _, b in want.values())
    for v in views:
        assert sum(s.payload for s in v.sends if s.group == "tp") == want_total
        assert sum(s.calls for s in v.sends if s.group == "tp") == sum(c for c, _ in want.values())


def test_pipeline_params_add_up_to_the_model():
    views = rank_views(TINY, Layout(pp=2), 8, 32)
    tied_copy = TINY.vocab_size * TINY.hidden  # the last stage keeps its own copy of the tied embedding
    assert sum(v.params for v in views) == param_count(TINY) + tied_copy
    assert {s.group for s in views[0].sends} == {"pp", "embedding"}


def test_draws_a_png_and_rejects_a_bad_layout(tmp_path, capsys):
    png = tmp_path / "x.png"
    assert main(["explain", "--dp", "2", "--tp", "2", "--pp", "2", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "tp" in err and "Traceback" not in err
    assert "rank = (pp * dp + dp_index)" in explain_text(TINY, Layout(), 8, 32)
