"""A damaged or hostile checkpoint.json is a CheckpointError (issue 15 item 11)."""

from __future__ import annotations

import json

import pytest
import torch

from paratrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ck", {"model": {"w": torch.ones(2)}}, {"step": 1})


def test_a_good_checkpoint_loads(ckpt):
    state, meta = load_checkpoint(ckpt)
    assert torch.equal(state["model"]["w"], torch.ones(2)) and meta["step"] == 1


@pytest.mark.parametrize("text, match", [
    ('{"step": 1, "file": "model.pt"', "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_malformed_manifest(ckpt, text, match):
    (ckpt / "checkpoint.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "sub/model.pt", "..", 7])
def test_a_file_outside_the_folder_is_refused(ckpt, tmp_path, name):
    outside = tmp_path / "outside.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, outside)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["file"] = name
    meta["sha256"] = __import__("hashlib").sha256(outside.read_bytes()).hexdigest()
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="plain file name inside the checkpoint folder"):
        load_checkpoint(ckpt)
