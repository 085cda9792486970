"""The planner knows Llama shapes: named sizes with the published parameter counts, grouped-query
attention and SwiGLU in the parameter, FLOPs and activation formulas, and Hugging Face configs
(``estimate|plan --hf-config``) read without importing torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paratrain.core.partition import layer_costs
from paratrain.models.configs import block_param_count, get_model_config, hf_shape, param_count
from paratrain.plan import formulas as f

REPO = Path(__file__).resolve().parents[2]
# meta-llama/Meta-Llama-3-8B's config.json (the fields that matter)
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}


def test_llama3_named_sizes_have_the_published_parameter_counts():
    assert param_count(get_model_config("llama-3-8b")) == 8_030_261_248
    assert param_count(get_model_config("llama-3-70b")) == 70_553_706_496
    assert param_count(hf_shape("llama", LLAMA3_8B)) == 8_030_261_248


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3-70b", "gpt2-124m"])
def test_block_formulas_agree_with_the_parameter_count(name):
    model = get_model_config(name)
    h, F, shape = model.hidden, model.ffn_hidden, f.shape_args(model)
    assert f.block_params_per_device(h, F, 1, **shape) == block_param_count(model)
    assert f.block_params_per_device(h, F, 8, **shape) < block_param_count(model) / 4
    # forward FLOPs of a block = 2 per matmul weight per token, plus the attention scores
    b, s = 2, 128
    norms_and_biases = 2 * h if model.family == "llama" else 9 * h + F
    matmul = 2 * b * s * (block_param_count(model) - norms_and_biases)
    assert f.layer_forward_flops(b, s, h, F, **shape) == matmul + 4 * b * s * s * h
    assert layer_costs(model, s, "params")[1] == block_param_count(model)


def test_gqa_and_swiglu_change_the_activations_as_stated():
    s, b, h, a, F = 1024, 1, 4096, 32, 14336
    plain = f.layer_activation_bytes(s, b, h, a, F, dropout=False, store_scores=False)
    gqa = f.layer_activation_bytes(s, b, h, a, F, dropout=False, store_scores=False, kv=1024)
    swiglu = f.layer_activation_bytes(s, b, h, a, F, dropout=False, store_scores=False, gated=True)
    assert plain - gqa == 2 * 2 * s * b * (h - 1024)  # K and V of 8 kv heads, not 32
    assert swiglu - plain == 2 * 2 * s * b * F  # gate, SiLU, up, product: 4sbF instead of 2sbF


def test_hf_shape_matches_the_transformers_model():
    transformers = pytest.importorskip("transformers")
    from paratrain.models.hf import build_hf

    for kind, fields in (("gpt2", {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 300, "n_positions": 64}),
                         ("llama", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8,
                                    "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300})):
        model = build_hf(kind, fields)
        assert param_count(hf_shape(kind, fields)) == sum(p.numel() for p in model.parameters()), kind
    assert transformers


def test_estimate_and_plan_read_a_hf_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    env_cmd = [sys.executable, "-m", "paratrain", "estimate", "--hf-config", str(path), "--hardware", "H100-80GB",
               "--dp", "8", "--tp", "8", "--global-batch", "64", "--seq-len", "4096"]
    r = subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hf-llama: 8,030,261,248 parameters on 64 x H100-80GB")
    r = subprocess.run([*env_cmd[:6], "--model", "tiny"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "give either --model or --hf-config" in r.stderr


@pytest.mark.parametrize("pp", [1, 4])
def test_the_memory_model_counts_every_llama_parameter_once(pp):
    """The planner's per-rank parameters (footprint) add up to the published count (Llama has no
    learned positions and RMSNorm without bias: a GPT-shaped formula would add them)."""
    from paratrain.config import Layout
    from paratrain.plan.footprint import LayoutMemory
    from paratrain.plan.options import CostOptions

    model = get_model_config("llama-3-8b")
    memory = LayoutMemory(model, Layout(pp=pp, microbatches=4), 8, 2048, "bf16", CostOptions())
    assert sum(memory._rank_parts(i)[0] for i in range(pp)) == param_count(model) == 8_030_261_248
