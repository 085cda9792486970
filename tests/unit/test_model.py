"""The reference model: exact parameter counts, deterministic init, tied head, shapes."""

import pytest
import torch

from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig, get_model_config, model_names, param_count
from paratrain.models.gpt import build_reference


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_is_exact(name, tie):
    cfg = get_model_config(name, tie_embeddings=tie)
    model = build_reference(cfg, seed=0)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)


def test_published_gpt2_count():
    # GPT-2 small as released by OpenAI: 124,439,808 parameters (tied head).
    assert param_count(get_model_config("gpt2-124m")) == 124_439_808


def test_registry_spans_tiny_to_planning_sizes():
    names = model_names()
    assert names[0] == "tiny"
    assert {"gpt2-124m", "gpt2-350m", "gpt2-1.3b", "gpt-7b", "gpt-13b", "gpt-70b"} <= set(names)
    assert param_count(get_model_config("gpt-70b")) > 60e9


def test_init_is_deterministic_and_seeded():
    cfg = get_model_config("tiny")
    a, b, c = build_reference(cfg, 1), build_reference(cfg, 1), build_reference(cfg, 2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert torch.equal(a.blocks[0].ln1.weight, torch.ones_like(a.blocks[0].ln1.weight))
    # residual projections start smaller (GPT-2 scaling)
    assert a.blocks[0].mlp.fc2.weight.std() < a.blocks[0].mlp.fc1.weight.std()


def test_tied_and_untied_head():
    tied = build_reference(get_model_config("tiny"), 0)
    assert tied.lm_head.weight is tied.wte.weight
    untied = build_reference(get_model_config("tiny", tie_embeddings=False), 0)
    assert untied.lm_head.weight is not untied.wte.weight


def test_forward_shapes_and_loss():
    model = build_reference(get_model_config("tiny"), 0)
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    loss = model(x, x)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x.reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_generate_extends_prompt():
    model = build_reference(get_model_config("tiny"), 0)
    out = model.generate(torch.tensor([[100, 101]]), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 7) and out[0, :2].tolist() == [100, 101]


def test_bad_model_shape():
    with pytest.raises(ConfigError, match="not divisible by 3 heads"):
        ModelConfig("x", num_layers=1, hidden=8, num_heads=3, vocab_size=10, max_seq_len=4)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_changes_nothing_but_memory(mode):
    from paratrain.parallel.recompute import apply_recompute

    cfg = get_model_config("tiny", dropout=0.1)
    ref, rec = build_reference(cfg, 0), build_reference(cfg, 0)
    assert apply_recompute(rec, mode) == 4
    x = torch.randint(0, 256, (2, 32))
    grads = []
    for m in (ref, rec):
        torch.manual_seed(7)  # same dropout masks; the checkpoint must replay them exactly
        m(x, x).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert list(dict(rec.named_parameters())) == list(dict(ref.named_parameters()))


def test_cpu_bf16_attention_backward_runs_in_fp32():
    """bf16 attention on CPU: the forward is ``scaled_dot_product_attention``'s own (bit for
    bit), the backward PyTorch's fused kernel in fp32 from the same saved tensors (3x faster
    here than its bf16 backward): its gradients are at least as close to an fp64 reference as
    the bf16 kernel's. Catches a forward that differs, a backward from wrong saved tensors
    (far off), or the fp32 path lost (the model's attention no longer using it)."""
    import torch.nn.functional as F

    from paratrain.models import gpt

    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 64, 4, 16, generator=gen) for _ in range(3)]
    ref = [b.double().transpose(1, 2).requires_grad_() for b in base]
    want = F.scaled_dot_product_attention(*ref, is_causal=True)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    want.backward(dy)
    errors = {}
    for name, fn in (("sdpa", lambda a: F.scaled_dot_product_attention(*a, is_causal=True)),
                     ("ours", lambda a: gpt._CpuHalfAttention.apply(*a))):
        xs = [b.bfloat16().transpose(1, 2).requires_grad_() for b in base]
        y = fn(xs)
        y.backward(dy.bfloat16())
        errors[name] = (y, max((x.grad.double() - r.grad).abs().max().item() for x, r in zip(xs, ref)))
    assert torch.equal(errors["ours"][0], errors["sdpa"][0])
    assert errors["ours"][1] <= min(errors["sdpa"][1], 0.05), errors
    calls = []
    real = gpt._CpuHalfAttention.apply
    gpt._CpuHalfAttention.apply = lambda *a: calls.append(1) or real(*a)  # type: ignore[method-assign]
    try:
        cfg = get_model_config("tiny")
        model = build_reference(cfg, 0).to(torch.bfloat16)
        x = torch.randint(0, cfg.vocab_size, (2, 16))
        model(x, x).float().backward()
    finally:
        gpt._CpuHalfAttention.apply = real  # type: ignore[method-assign]
    assert len(calls) == cfg.num_layers
