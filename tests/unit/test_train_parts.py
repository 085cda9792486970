"""Learning-rate schedule, optimizer groups, checkpoint atomicity and verification."""

import json

import pytest
import torch

from paratrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from paratrain.config import TrainConfig
from paratrain.models.configs import get_model_config
from paratrain.models.gpt import build_reference
from paratrain.optim import lr_at, param_groups


def test_lr_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = build_reference(get_model_config("tiny"), 0)
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in (decay, no_decay)) == len(list(model.parameters()))


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}}
    folder = save_checkpoint(tmp_path / "ck", state, {"step": 7})
    loaded, meta = load_checkpoint(folder)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and meta["step"] == 7
    assert not list(folder.glob(".*tmp*")), "temporary files must not remain"
    data = bytearray((folder / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(folder)


def test_checkpoint_missing_parts(tmp_path):
    with pytest.raises(CheckpointError, match="not a paratrain checkpoint"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path / "ck", {"a": torch.zeros(1)}, {})
    (folder / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder)
    assert json.loads((folder / "checkpoint.json").read_text())["sha256"]
