"""``paratrain plan`` answers what it answered before its search was made faster: the same
layouts in the same order, with the same predicted figures, the same counts and explanation, on
searches recorded (``tests/data/plan_rankings.json``) with the search of 2026-12-01 (issue 9, part
7: before pruning by memory and bounding groups of layouts). A pruning that dropped a layout it
should not have, or a bound above a layout's step time, changes a top 10; a cached piece keyed on
too few factors changes a figure.

A deliberate change of the cost model changes the figures: record them again with
``python tests/unit/test_plan_rankings.py --record`` and say so in the commit."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

from paratrain.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "plan_rankings.json"
# A Llama of Hugging Face's config.json fields: grouped-query attention, SwiGLU, untied head.
HF_LLAMA = json.dumps({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 22,
                       "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False},
                      separators=(",", ":"))
CASES = {  # name: the plan command's arguments (each one's --json output is recorded)
    "gpt2-1.3b on 64 H100": "--model gpt2-1.3b --devices 64 --global-batch 512",
    "gpt2-1.3b on 512 H100": "--model gpt2-1.3b --devices 512 --global-batch 512",
    "gpt-13b on 64 A100": "--model gpt-13b --devices 64 --global-batch 512 --hardware A100-80GB",
    "gpt-13b on 32 x 16 GiB": "--model gpt-13b --devices 32 --global-batch 64 --hardware H100-80GB --memory-gib 16",
    "tiny on 4 cpu": "--model tiny --devices 4 --global-batch 16 --hardware cpu",
    "small on 8 cpu fp32": "--model small --devices 8 --global-batch 32 --hardware cpu --precision fp32",
    "llama-3-8b on 32 H100, 4k": "--model llama-3-8b --devices 32 --global-batch 128 --seq-len 4096",
    "hf llama on 16 A100-40GB": f"--hf-config {HF_LLAMA} --devices 16 --global-batch 64 --hardware A100-40GB",
    "gpt2-350m tight, no overlap": "--model gpt2-350m --devices 16 --global-batch 64 --hardware A100-80GB "
                                   "--memory-gib 3 --no-overlap",
    "gpt2-1.3b pinned pp 4, fp32 grads": "--model gpt2-1.3b --devices 32 --global-batch 256 --pp 4 --grad-dtype fp32",
}
def _argv(name: str) -> list[str]:
    words = CASES[name].split(" ")
    return ["plan", *words, "--json"]


def answer(name: str) -> dict:
    """The recorded part of ``plan --json``: counts, explanation, and per ranked layout its
    fields and predicted figures."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(_argv(name)) == 0
    doc = json.loads(out.getvalue())
    keys = ("step_time_s", "peak_bytes_per_device", "activation_bytes_per_device", "model_state_bytes_per_device",
            "comm_bytes_per_device", "bubble_fraction", "mfu", "step_time_breakdown_s")
    return {"considered": doc["considered"], "fitting": doc["fitting"], "explanation": doc["explanation"],
            "ranked": [{"layout": e["layout"], **{k: e[k] for k in keys}} for e in doc["ranked"]]}


def _close(got: object, want: object, where: str) -> None:
    """Equal, floats to 1e-12 relative: the figures are the same sums (a reordered one may move an ulp)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            _close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-300), \
            f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_plan_answers_as_recorded(name: str) -> None:
    want = json.loads(DATA.read_text())[name]
    _close(answer(name), want, name)


def record() -> None:
    DATA.write_text(json.dumps({name: answer(name) for name in CASES}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        record()
