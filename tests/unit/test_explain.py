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
