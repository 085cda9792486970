"""The mixture-of-experts reference (models/moe.py), its shapes and parameter counts, and the
expert-parallel rules (expert_rules.py, mesh.py): pure or single-process, fast."""

from __future__ import annotations

import pytest
import torch

from paratrain.config import Layout, TrainConfig
from paratrain.errors import ConfigError
from paratrain.mesh import MeshShape
from paratrain.models.configs import ModelConfig, active_param_count, get_model_config, param_count
from paratrain.models.moe import route


def test_tiny_moe_builds_exactly_its_parameter_count():
    from paratrain.models.gpt import build_reference

    for every in (1, 2):
        cfg = get_model_config("tiny-moe", moe_every=every)
        model = build_reference(cfg, 0)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
        assert len(model.moe) == cfg.num_moe_blocks == (2 if every == 1 else 1)
    cfg = get_model_config("tiny-moe")  # 2 of 4 experts active per token
    assert param_count(cfg) - active_param_count(cfg) == 2 * 2 * (2 * 64 * 128 + 128 + 64)


def test_mixtral_8x7b_is_the_published_shape():
    """transformers' MixtralConfig defaults are our mixtral-8x7b; 46.7B parameters, 12.9B active
    (Jiang et al. 2024): 46,702,792,704 exactly, what MixtralForCausalLM(MixtralConfig()) counts
    on the meta device (checked by hand: too slow for the suite); here a small Mixtral checks the
    formula's structure (SwiGLU experts, router, GQA, untied head) against transformers."""
    pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    ours = get_model_config("mixtral-8x7b")
    hf = MixtralConfig()
    assert (ours.hidden, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.ffn_hidden, ours.num_experts,
            ours.top_k, ours.vocab_size, ours.max_seq_len, ours.aux_loss_coef, ours.tie_embeddings) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size,
        hf.num_local_experts, hf.num_experts_per_tok, hf.vocab_size, hf.max_position_embeddings,
        hf.router_aux_loss_coef, hf.tie_word_embeddings)
    assert param_count(ours) == 46_702_792_704 and round(param_count(ours) / 1e9, 1) == 46.7
    assert active_param_count(ours) == 12_879_925_248 and round(active_param_count(ours) / 1e9, 1) == 12.9
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, vocab_size=100)
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**small))
    shape = ModelConfig("m", num_layers=2, hidden=32, num_heads=4, num_kv_heads=2, ffn_hidden=48, num_experts=4,
                        top_k=2, vocab_size=100, max_seq_len=64, family="llama", tie_embeddings=False)
    assert param_count(shape) == sum(p.numel() for p in model.parameters())


def test_routing_breaks_ties_by_index_and_drops_past_capacity():
    """Equal logits: every token picks experts 0 and 1, the lowest indices; capacity
    ceil(1.0 x 4 x 2 / 4) = 2 per expert and sequence keeps positions 0 and 1 of each."""
    r = route(torch.zeros(2, 4, 4), top_k=2, capacity_factor=1.0)
    assert r.assigned.tolist() == [8, 8, 0, 0]
    assert r.counts.tolist() == [4, 4, 0, 0] and int(r.dropped) == 8  # 2 per sequence and expert kept
    assert r.token.tolist() == [0, 1, 4, 5, 0, 1, 4, 5]  # positions 0 and 1 of each sequence
    assert torch.allclose(r.gate, torch.full((8,), 0.5))  # top-2 gates renormalised
    # uniform probabilities P_e = 1/4 make aux = E * sum_e f_e / 4 = 1 however unbalanced f is
    assert float(r.aux) == pytest.approx(1.0)
    skewed = route(torch.tensor([[[2.0, 1.0, 0.0, 0.0]]]).expand(1, 4, 4), top_k=1, capacity_factor=0.0)
    assert float(skewed.aux) == pytest.approx(4 * float(torch.softmax(torch.tensor([2.0, 1, 0, 0]), 0)[0]))


def test_top1_gates_are_probabilities_and_balanced_routing_has_aux_one():
    logits = torch.eye(4).repeat(1, 2, 1) * 3.0  # (1, 8, 4): tokens cycle over the experts
    r = route(logits, top_k=1, capacity_factor=0.0)
    assert r.counts.tolist() == [2, 2, 2, 2] and int(r.dropped) == 0
    assert torch.allclose(r.gate, torch.softmax(torch.tensor([3.0, 0, 0, 0]), 0)[0].expand(8))
    assert float(r.aux) == pytest.approx(1.0)


def _validate(model: str = "tiny-moe", **layout) -> None:
    TrainConfig(model=model, global_batch=8, seq_len=32, layout=Layout(**layout)).validate()


@pytest.mark.parametrize("layout, message", [
    (dict(dp=2, ep=4), "ep must divide dp; got ep=4, dp=2"),
    (dict(dp=4, ep=3), "ep=3 must divide the model's 4 experts"),  # that first: no dp would do
    (dict(dp=8, ep=8), "ep=8 must divide the model's 4 experts"),
    (dict(tp=2, sequence_parallel=True), "sequence parallelism"),
    (dict(cp=2), "context parallelism (cp=2)"),
    (dict(recompute="full"), "full recomputation"),
])
def test_expert_layout_rules(layout, message):
    with pytest.raises(ConfigError, match=None) as e:
        _validate(**layout)
    assert message in str(e.value)


def test_ep_needs_experts_and_composes_with_dp_and_tp():
    with pytest.raises(ConfigError, match="has none"):
        _validate("tiny", dp=2, ep=2)
    for layout in (dict(dp=2, ep=2), dict(dp=4, ep=2), dict(dp=4, ep=4), dict(dp=2, ep=2, tp=2),
                   dict(dp=2, ep=2, microbatches=2), dict(recompute="selective"), dict(zero=2, dp=2),
                   dict(pp=2), dict(dp=2, ep=2, pp=2, microbatches=2), dict(dp=4, ep=2, zero=1),
                   dict(dp=4, ep=2, zero=2), dict(dp=4, ep=2, zero=3)):
        _validate(**layout)
    assert str(Layout(dp=4, ep=2)) == "dp=4 pp=1 tp=1 ep=2"


def test_ep_groups_sub_divide_the_dp_groups():
    """dp index d = edp index * ep + ep index: ep groups of consecutive dp indices, edp groups
    ep apart; together they partition every dp group."""
    s = MeshShape(dp=4, tp=2, ep=2)  # dp group of tp 0: ranks 0, 2, 4, 6
    assert s.expert_groups("ep") == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert s.expert_groups("edp") == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert MeshShape(dp=2, ep=1).expert_groups("ep") == [[0], [1]]
    with pytest.raises(ValueError):
        MeshShape(dp=4, ep=3)


def test_moe_config_fields_are_checked():
    for bad in (dict(top_k=3), dict(capacity_factor=-1.0), dict(aux_loss_coef=float("nan")), dict(num_experts=-1)):
        with pytest.raises(ConfigError):
            get_model_config("tiny-moe", **bad)
    assert get_model_config("tiny-moe", capacity_factor=None).capacity_factor == 0.0  # None: dropless
    assert TrainConfig(model="tiny-moe", top_k=1, capacity_factor=0.0).model_config().top_k == 1
