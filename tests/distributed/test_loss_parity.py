"""Whole-run loss parity: a refactor must not move the loss curve (STYLE rule 13).

Trains `tiny` for 20 steps on 2 data-parallel ranks on a generated text (deterministic, so the
golden numbers depend on torch's arithmetic only, not on this Python's standard library) and
compares every step's loss with tests/data/golden_losses.json. Regenerate deliberately, after a
change that is *meant* to alter the numbers, with:  python tests/distributed/test_loss_parity.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))

from paratrain.config import Layout, TrainConfig  # noqa: E402
from tests.common import train_ranks_fn  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

GOLDEN = HERE.parents[1] / "data" / "golden_losses.json"
WORDS = ("def", "return", "self", "class", "import", "for", "in", "if", "else", "value", "data", "(", ")",
         ":", "=", "+", "\n", "    ", "x", "y", "None", "True", "list", "dict", "print", ",", ".")
# Same-seed runs are bit-identical here; the bound only absorbs a different CPU's vector paths.
RTOL = 1e-4


def corpus(path: Path) -> Path:
    rng = random.Random(1234)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(120_000)))
    return path


def config(data: Path) -> TrainConfig:
    return TrainConfig(model="tiny", steps=20, global_batch=8, seq_len=64, lr=3e-3, warmup_steps=5,
                       data=str(data), layout=Layout(dp=2), eval_every=0, sample_tokens=0,
                       checkpoint=False, progress=False)


def measure(tmp: Path) -> list[float]:
    return run_ranks(2, train_ranks_fn, config(corpus(tmp / "corpus.txt")))[0]["losses"]


@pytest.mark.equivalence
def test_loss_curve_matches_golden(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = measure(tmp_path)
    assert len(losses) == len(golden["losses"])
    assert losses == pytest.approx(golden["losses"], rel=RTOL), "the loss curve moved"
    assert losses[-1] < losses[0] - 1.0  # and it is a real training curve


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps({"losses": measure(Path(d))}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
