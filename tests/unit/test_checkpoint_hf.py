"""A checkpoint converted for Hugging Face transformers loads into ``GPT2LMHeadModel`` and computes
our model's logits; the way back (``--init-from`` a GPT-2 folder) gives our weights again."""

from __future__ import annotations

import pytest
import torch

from paratrain.checkpoint import convert
from paratrain.checkpoint.boxes import full_box
from paratrain.checkpoint.store import Shard, begin, commit, stage, write_rank
from paratrain.models.configs import get_model_config
from paratrain.models.gpt import build_reference

transformers = pytest.importorskip("transformers", reason="transformers is the test-only extra (pip install .[dev])")


def _save_reference(root, model) -> None:
    folder = begin(root, 3, 0, lambda: None)
    seen, shards = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            shards.append(Shard(name, tuple(t.shape), full_box(t.shape), t.detach()))
    write_rank(folder, 0, stage(shards))
    commit(root, 3, 1, {"config": {"model": model.cfg.name}}, 0, 5.0)


@pytest.mark.parametrize("tied", [True, False])
def test_to_hf_gives_our_logits_and_comes_back(tmp_path, tied):
    cfg = get_model_config("tiny", **({} if tied else {"tie_embeddings": False}))
    ours = build_reference(cfg, seed=1)
    with torch.no_grad():  # make the biases and norms non-trivial, so a mis-mapped one shows
        for name, p in ours.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    _save_reference(tmp_path / "ck", ours)
    convert.to_hf(tmp_path / "ck", tmp_path / "hf", cfg)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine = hf(idx).logits, ours.eval()(idx)
    # The same function through other kernels (GPT-2's Conv1D is addmm on the transposed weight):
    # float reordering moves fp32 logits of this size by ~1e-6; a weight mapped to the wrong
    # place, left untransposed or dropped (the untied head) moves them by O(0.1).
    assert torch.allclose(theirs, mine, atol=1e-5, rtol=1e-5), (theirs - mine).abs().max()
    back = convert.read_init(tmp_path / "hf")
    fresh = build_reference(cfg, seed=2)
    fresh.load_state_dict(back)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()))
