"""The closed-form formulas of paratrain.plan.formulas, against the papers' own forms and each other."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paratrain.config import RECOMPUTE
from paratrain.models.configs import ModelConfig, block_param_count, param_count
from paratrain.plan import formulas as f


def test_step_flops_vs_six_p_tokens_exact_difference() -> None:
    """step_flops - 6 P B s, written out: the attention scores (12 B s^2 l h) are in the FLOPs but
    not in 6PD; biases/LayerNorms (78 B s l h + 12 B s h) and positions (6 B s^2 h) are in 6PD only."""
    l, h, a, V, s, B = 24, 2048, 16, 50304, 2048, 8
    model = ModelConfig("x", num_layers=l, hidden=h, num_heads=a, vocab_size=V, max_seq_len=s)
    diff = f.step_flops(model, B, s) - f.six_p_tokens(param_count(model), B * s)
    assert diff == pytest.approx(12 * B * s * s * l * h - 6 * B * s * s * h - 78 * B * s * l * h - 12 * B * s * h)


def test_recompute_flops() -> None:
    b, s, h, F = 2, 1024, 1024, 4096
    assert f.recompute_forward_flops("none", b, s, h, F) == 0
    assert f.recompute_forward_flops("selective", b, s, h, F) == 4 * b * s * s * h
    assert f.recompute_forward_flops("full", b, s, h, F) == f.layer_forward_flops(b, s, h, F)
    assert f.layer_forward_flops(b, s, h, 4 * h) == pytest.approx(24 * b * s * h * h * (1 + s / (6 * h)))


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_block_params_per_device(t: int) -> None:
    h, F = 1024, 4096
    cfg = ModelConfig("x", num_layers=1, hidden=h, num_heads=16, vocab_size=256, max_seq_len=64, ffn_hidden=F)
    # t shards hold the split part once and the 6h replicated part t times.
    assert t * f.block_params_per_device(h, F, t) == block_param_count(cfg) + (t - 1) * 6 * h


def test_korthikanti_table2_forms() -> None:
    """[K22] Table 2 with 16-bit activations and dropout, F = 4h."""
    s, b, h, a, t = 2048, 4, 4096, 32, 8
    act = f.layer_activation_bytes
    sbh, r = s * b * h, a * s / h
    assert act(s, b, h, a, 4 * h) == pytest.approx(sbh * (34 + 5 * r))
    assert act(s, b, h, a, 4 * h, t) == pytest.approx(sbh * (10 + 24 / t + 5 * r / t))
    assert act(s, b, h, a, 4 * h, t, sp=True) == pytest.approx(sbh / t * (34 + 5 * r))
    assert act(s, b, h, a, 4 * h, t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert act(s, b, h, a, 4 * h, t, sp=True, recompute="selective") == pytest.approx(sbh * 34 / t)
    assert act(s, b, h, a, 4 * h, t, recompute="full") == pytest.approx(2 * sbh)
    assert act(s, b, h, a, 4 * h, t, sp=True, recompute="full") == pytest.approx(2 * sbh / t)


def test_activation_general_forms() -> None:
    """Any element size and MLP width: e (16 sbh + 2 as^2 b) + masks (2 sbh + as^2 b) at F = 4h, and
    Megatron's (18 + 4F/h) sbh for the F-dependence (theoretical_memory_usage.py)."""
    s, b, h, a = 512, 2, 768, 12
    for e in (2, 4):
        assert f.layer_activation_bytes(s, b, h, a, 4 * h, elem_bytes=e) == pytest.approx(
            e * (16 * s * b * h + 2 * a * s * s * b) + 2 * s * b * h + a * s * s * b)
    F = 3 * h
    no_scores = f.layer_activation_bytes(s, b, h, a, F, recompute="selective")
    assert no_scores == pytest.approx(s * b * h * (18 + 4 * F / h))
    # a fused kernel keeps the per-row log-sum-exp instead of the scores
    assert f.layer_activation_bytes(s, b, h, a, 4 * h, dropout=False, store_scores=False) == \
        32 * s * b * h + 4 * a * s * b
    assert f.layer_activation_bytes(s, b, h, a, 4 * h, dropout=False, store_scores=False,
                                    recompute="selective") == 32 * s * b * h


def test_sequence_parallel_with_gathered_linear_inputs() -> None:
    """paratrain's SP saves the all-gathered qkv/fc1 inputs: 2 e sbh stay whole, the rest / t."""
    s, b, h, a, t, e = 256, 2, 512, 8, 4, 4
    k22 = f.layer_activation_bytes(s, b, h, a, 4 * h, t, sp=True, elem_bytes=e, dropout=False)
    ours = f.layer_activation_bytes(s, b, h, a, 4 * h, t, sp=True, elem_bytes=e, dropout=False,
                                    sp_saves_gathered=True)
    assert ours - k22 == pytest.approx(2 * e * s * b * h * (1 - 1 / t))
    assert f.output_activation_bytes(s, b, h, 256, t, True, e, sp_saves_gathered=True) - \
        f.output_activation_bytes(s, b, h, 256, t, True, e) == pytest.approx(e * s * b * h * (1 - 1 / t))


@given(psi=st.floats(1, 1e12), dp=st.integers(1, 4096), precision=st.sampled_from(["bf16", "fp32"]))
def test_zero_stages_never_increase_memory(psi: float, dp: int, precision: str) -> None:
    totals = [f.model_state_bytes(psi, z, dp, precision).total for z in range(4)]
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert totals[0] == pytest.approx(16 * psi)  # 2+2+12 and 4+4+8 are both 16 bytes per parameter





@given(s=st.sampled_from([128, 1024, 4096]), b=st.integers(1, 16), t=st.sampled_from([1, 2, 4, 8]),
       sp=st.booleans(), e=st.sampled_from([2, 4]))
def test_recompute_and_sp_never_add_activation_memory(s: int, b: int, t: int, sp: bool, e: int) -> None:
    h, a = 1024, 16
    by = [f.layer_activation_bytes(s, b, h, a, 4 * h, t, sp, r, e) for r in RECOMPUTE]
    assert by[0] >= by[1] >= by[2] > 0
    assert f.layer_activation_bytes(s, b, h, a, 4 * h, t, True, "none", e) <= by[0] + 1e-6
