"""A Hugging Face run saved after step 2 and resumed (what `paratrain train --resume` does after a
crash: the same checkpoint save and load, `paratrain/checkpoint/session.py`) continues like the run
that was never interrupted, to the bit: GPT-2 at dp 2 (each rank its own rows, the data position)
and Llama at tp 2 (sharded q/k/v heads and SwiGLU, padded vocabulary), both with ZeRO-1 (sharded
AdamW state). Both models and both phases in one launch (the test-time budget)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from paratrain.config import Layout  # noqa: E402
from tests.distributed.test_hf import CFG  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

SAVE_AT, STEPS = 2, 4
CASES = {"gpt2": Layout(dp=2, zero=1), "llama": Layout(tp=2)}


def _save_then_resume(cfgs: list, root: str) -> list[dict]:
    """Every rank, each config: train STEPS steps saving after SAVE_AT (the uninterrupted run);
    then a fresh session loads that checkpoint and trains the steps after it."""
    from paratrain.checkpoint import session as ck
    from paratrain.checkpoint.store import CheckpointSaver, find_valid
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    out = []
    for i, cfg in enumerate(cfgs):
        folder = Path(root) / str(i)
        s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
        saver = CheckpointSaver(folder, s.mesh.rank, s.mesh.shape.world_size, torch.distributed.barrier,
                                asynchronous=False)
        full = {}
        for step in range(1, STEPS + 1):
            full[step] = train_step(s, step)["loss"]
            if step == SAVE_AT:
                ck.save(saver, s, step, {"model": cfg.hf})
        torch.distributed.barrier()
        r = setup(cfg, RankEnv.from_env(), torch.device("cpu"))  # a new session: as after a restart
        ckpt, manifest, _ = find_valid(folder)
        ck.load(r, ckpt, manifest)
        resumed = {step: train_step(r, step)["loss"] for step in range(manifest.step + 1, STEPS + 1)}
        out.append({"full": full, "resumed": resumed, "from": manifest.step})
    return out


def test_hf_runs_resume_bit_for_bit(tmp_path):
    cfgs = [CFG[kind].replace(layout=layout, steps=STEPS) for kind, layout in CASES.items()]
    results = run_ranks(2, _save_then_resume, cfgs, str(tmp_path), timeout=240)
    for kind, res in zip(CASES, results[0]):
        assert res["from"] == SAVE_AT, kind
        assert res["resumed"] == {s: res["full"][s] for s in range(SAVE_AT + 1, STEPS + 1)}, kind  # bit for bit
