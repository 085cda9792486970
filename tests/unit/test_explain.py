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


LLAMA = ('{"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, '
         '"intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 64}')
GPT2 = '{"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 256, "n_positions": 256}'


def test_hf_configs_are_explained_with_their_own_names_and_counts(tmp_path, capsys):
    from paratrain.models.configs import hf_shape

    cfg = tmp_path / "llama.json"
    cfg.write_text(LLAMA)
    assert main(["explain", "--tp", "2", "--pp", "2", "--hf", "llama", "--hf-config", str(cfg),
                 "--global-batch", "8", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "hf-llama [dp=1 pp=2 tp=2" in out and "blocks 2-3, final RMSNorm + head" in out
    # grouped-query attention: 8 query heads and 2 kv heads, each split over tp = 2
    assert "self_attn.q_proj.weight  rows [32:64] (heads 4-7 of 8) of (64, 64)" in out
    assert "self_attn.k_proj.weight  rows [8:16] (key/value head 1 of 2) of (16, 64)" in out
    assert "mlp.gate_proj.weight     rows [64:128] of (128, 64)" in out  # SwiGLU: gate and up column,
    assert "mlp.down_proj.weight     columns [64:128] of (64, 128): row-parallel" in out  # down row
    llama = hf_shape("llama", __import__("json").loads(LLAMA))
    assert rank_views(llama, Layout(), 8, 64)[0].params == param_count(llama)  # one rank: the whole model
    # GPT-2 (family from its fields): Conv1D weights are (in, out), so the column split takes columns
    assert main(["explain", "--tp", "2", "--hf-config", GPT2]) == 0
    out = capsys.readouterr().out
    assert "attn.c_attn.weight  columns [64:128] of each of q, k, v (heads 2-3 of 4) of (128, 384)" in out
    gpt2 = hf_shape("gpt2", __import__("json").loads(GPT2))
    assert rank_views(gpt2, Layout(), 8, 64)[0].params == param_count(gpt2) == param_count(TINY)


@pytest.mark.parametrize("argv,message", [
    (["--tp", "4", "--hf", "llama", "--hf-config", LLAMA], "key/value heads"),
    (["--hf", "llama"], "--hf llama needs --hf-config"),
    (["--hf", "gpt2", "--hf-config", LLAMA.replace("{", '{"model_type": "llama", ')], "model_type 'llama'"),
    (["--model", "tiny", "--hf-config", GPT2], "either --model or --hf"),
])
def test_bad_hf_explain_is_exit_2(argv, message, capsys):
    assert main(["explain", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


def test_context_parallel_ranks_groups_and_ring_bytes(capsys):
    """cp: the ring's sends per rank are the formula the runtime's cp counters are tested with
    (core.traffic.cp_comm_per_step), and the gradients are averaged over dp x cp."""
    from paratrain.core.ring import wire_bytes
    from paratrain.core.traffic import cp_comm_per_step

    layout = Layout(cp=2, tp=2, microbatches=2)
    views = rank_views(TINY, layout, 8, 64)
    assert [(v.cp, v.tp) for v in views] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ring = {op.removesuffix("_send"): cb for op, cb in cp_comm_per_step(TINY, 2, 2, 8, 64, 2).items()
            if op.endswith("_send")}
    for v in views:
        assert {s.op: (s.calls, s.payload) for s in v.sends if s.group == "cp"} == ring
        (grads,) = [s for s in v.sends if s.group == "dp x cp"]  # one all-reduce over the 2 cp ranks
        assert grads.op == "all_reduce" and grads.wire == wire_bytes("all_reduce", 2, 4 * v.params)
    assert main(["explain", "--cp", "2", "--tp", "2", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "cp: [0, 2]  [1, 3]" in out and "* cp + cp_index) * tp + tp_index" in out


def test_expert_parallel_params_and_exchanges(capsys):
    """ep: each rank holds E / ep experts (the ep group's ranks together hold the model once),
    sends the all-to-alls of core.traffic.ep_comm_per_step, and reduces its experts' gradients
    over the dp / ep ranks holding the same experts (edp), the rest over dp."""
    from paratrain.core.traffic import ep_comm_per_step

    moe = get_model_config("tiny-moe")
    layout = Layout(dp=4, ep=2)
    views = rank_views(moe, layout, 8, 32)
    assert [v.ep for v in views] == [0, 1, 0, 1]
    dense = {v.rank: sum(s.payload for s in v.sends if s.group == "dp" and s.payload > 4) for v in views}
    experts = {v.rank: sum(s.payload for s in v.sends if s.group == "edp" and s.payload > 4) for v in views}
    whole = param_count(moe)
    assert sum(views[r].params for r in (0, 1)) - dense[0] // 4 == whole  # dense once + both halves of the experts
    assert 0 < experts[0] < dense[0] and (dense[0] + experts[0]) // 4 == views[0].params
    want = ep_comm_per_step(moe, 2, 2, 32)
    assert {s.op: (s.calls, s.payload) for s in views[0].sends if s.group == "ep"} == want
    assert main(["explain", "--dp", "4", "--ep", "2", "--model", "tiny-moe"]) == 0
    out = capsys.readouterr().out
    assert "[0, 1]  [2, 3]" in out and "edp (the same experts" in out and "ep rank 1: experts 2-3" in out
    assert main(["explain", "--dp", "4", "--ep", "3", "--model", "tiny-moe"]) == 2


def test_zb_v_holds_first_and_last_stage_on_rank_0():
    """ZB-V's V: rank 0 runs stages 0 and 2p - 1, so the tied embedding is one weight there (no
    copy, no tied all-reduce) and the ranks' parameters add up to the model exactly."""
    views = rank_views(TINY, Layout(pp=2, microbatches=4, schedule="zb-v", virtual_stages=2), 8, 32)
    assert views[0].units == ("embedding", "block 0", "block 3", "final LayerNorm + head")
    assert views[1].units == ("block 1", "block 2")
    assert sum(v.params for v in views) == param_count(TINY)
    assert all(s.group != "embedding" for v in views for s in v.sends)
