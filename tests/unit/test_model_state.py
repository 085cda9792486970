"""core/state.ModelState: the one record the runtime measures and the planner predicts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from paratrain.config import Layout
from paratrain.core.state import ModelState
from paratrain.models.configs import get_model_config, param_count
from paratrain.models.gpt import build_reference
from paratrain.parallel.memory import model_state_bytes as measure
from paratrain.plan import formulas as f
from paratrain.plan.cost import estimate
from paratrain.plan.hardware import get_hardware


def test_the_core_record_imports_without_torch() -> None:
    code = "import sys, paratrain.core.state; assert 'torch' not in sys.modules, 'core/state.py imported torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_measured_is_predicted_on_one_process() -> None:
    """fp32 AdamW after a step, no sharding: the runtime's exact bytes are the planner's
    (P + G + K) psi = 16 psi, field by field, plus AdamW's 0-d fp32 step count per tensor."""
    cfg = get_model_config("tiny")
    model = build_reference(cfg, 0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))).backward()
    opt.step()
    measured = measure(model, opt)
    predicted = f.model_state_bytes(param_count(cfg), 0, 1, "fp32")
    assert type(measured) is type(predicted) is ModelState
    steps = len(list(model.parameters()))
    assert measured - predicted == ModelState(0, 0, 4 * steps)
    assert measured.total == predicted.total + 4 * steps
    # summary.json's `memory` keeps exact byte counts: the measurement stays integers
    assert all(type(v) is int for v in measured.as_dict().values()), measured


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_estimate_reports_the_record_under_its_json_keys(zero: int) -> None:
    """``estimate --json``'s ``memory_bytes`` and ``model_state_bytes_per_device`` are the record's
    fields and total; the record reads back from that JSON."""
    e = estimate(get_model_config("gpt2-124m"), Layout(dp=8, zero=zero), get_hardware("A100-80GB"), 64, 1024)
    d = e.to_dict()
    assert list(d["memory_bytes"])[:3] == list(e.state.as_dict())
    assert ModelState.from_dict(d["memory_bytes"]) == e.state
    assert d["model_state_bytes_per_device"] == e.state.total


def test_reads_back_from_a_memory_record_with_activations() -> None:
    """summary.json's ``memory`` (and ``predicted.memory_per_rank``) add ``activations``."""
    state = ModelState(12, 8, 4)
    assert ModelState.from_dict(dict(state.as_dict(), activations=7)) == state
