"""ActivationMeter and model_state_bytes: exact bytes, the planner's accounting on one process."""

from __future__ import annotations

import pytest
import torch

from paratrain.models.configs import get_model_config
from paratrain.models.gpt import build_reference
from paratrain.parallel.memory import ActivationMeter, model_state_bytes
from paratrain.parallel.recompute import apply_recompute
from paratrain.plan import formulas as f


def test_counts_saved_storages_once_and_not_parameters() -> None:
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    meter = ActivationMeter([w])
    with meter:
        y = x @ w            # saves x (128 bytes) and w (a parameter: not counted)
        z = y.relu()         # saves its output (128 bytes)
        q = z[:2] * z[2:]    # saves two views of z's storage: counted once
        loss = q.sum()
    assert meter.live_bytes == meter.peak_bytes == 4 * 8 * 4 * 2
    loss.backward()
    assert meter.live_bytes == 0 and meter.peak_bytes == 256


def gathered_view(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Regather a freed buffer in place, as ZeRO-3 does, and view it as a weight."""
    storage = flat.untyped_storage()
    storage.resize_(flat.numel() * flat.element_size())
    return flat.new_empty(0).set_(storage, 0, shape).requires_grad_()


@pytest.mark.parametrize("told", [True, False])
def test_weights_are_what_the_meter_is_given(told: bool) -> None:
    """A buffer that holds weights although no parameter views it (ZeRO-3's unit: freed to 0
    bytes between uses, regathered in place) is skipped by a meter built with it -- even while
    freed -- and counted as an activation by one built without it: no process-wide registry."""
    flat = torch.randn(64)
    flat.untyped_storage().resize_(0)
    meter = ActivationMeter([flat] if told else [])
    w = gathered_view(flat, (8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with meter:
        loss = (x @ w).sum()  # saves x (128 bytes) and the gathered w (256 bytes)
    assert meter.peak_bytes == 128 + (0 if told else 256)
    loss.backward()
    assert meter.live_bytes == 0


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_gpt_activations_match_the_planner(recompute: str) -> None:
    """One process, fp32, no dropout, PyTorch's fused attention: the planner's per-layer,
    embedding and head terms sum to the measured peak within 0.5% (what is left: LayerNorm's
    per-row mean and 1/std, 2 x 4 bytes per token each)."""
    cfg = get_model_config("tiny")
    model = build_reference(cfg, 0)
    apply_recompute(model, recompute)
    b, s = 4, 64
    x, y = torch.randint(0, 256, (b, s)), torch.randint(0, 256, (b, s))
    meter = ActivationMeter(model.parameters())
    with meter:
        model(x, y).backward()
    h, F, a, V = cfg.hidden, cfg.ffn_hidden, cfg.num_heads, cfg.vocab_size
    predicted = cfg.num_layers * f.layer_activation_bytes(s, b, h, a, F, recompute=recompute, elem_bytes=4,
                                                          dropout=False, store_scores=False) \
        + f.embedding_activation_bytes(s, b, h, dropout=False) + f.output_activation_bytes(s, b, h, V, elem_bytes=4)
    assert meter.peak_bytes == pytest.approx(predicted, rel=5e-3)
    assert meter.live_bytes == 0


def test_model_state_bytes_counts_params_grads_and_adam() -> None:
    cfg = get_model_config("tiny")
    model = build_reference(cfg, 0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))).backward()
    opt.step()
    got = model_state_bytes(model, opt).as_dict()
    n = sum(p.numel() for p in model.parameters())  # the tied head is one parameter
    steps = len(list(model.parameters()))  # AdamW keeps a 0-d fp32 step per parameter
    assert got == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n + 4 * steps}
