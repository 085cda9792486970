"""`paratrain train` with tensor parallelism, as a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import assert_like_reference, paratrain


@pytest.mark.equivalence
def test_dp2_tp2_sequence_parallel_from_the_cli(tmp_path):
    """4 processes, dp 2 x tp 2 with sequence parallelism: the reference's losses (rounding
    only, see tests/distributed/test_tensor_parallel.py), and a checkpoint of full reference shapes."""
    r = paratrain("train", "--nproc", "4", "--dp", "2", "--tp", "2", "--sequence-parallel",
                  "--steps", "3", "--global-batch", "8", "--seq-len", "32", "--eval-every", "3",
                  "--sample-tokens", "8", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dp=2 pp=1 tp=2 sp on 4 process(es)" in r.stdout
    assert "sampled from the trained model" in r.stdout  # rank 0 rebuilt the full model
    assert_like_reference(tmp_path / "o")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {"all_gather", "reduce_scatter"} <= set(summary["comm"]["tp"]["ops"])


def test_sequence_parallel_needs_divisible_sequence(tmp_path):
    r = paratrain("train", "--tp", "2", "--sequence-parallel", "--seq-len", "33", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "seq_len divisible by tp (got tp=2, seq_len=33)" in r.stderr
    assert "Use a tp > 1 that divides seq_len" in " ".join(r.stderr.split())


@pytest.mark.equivalence
def test_tp2_on_a_vocabulary_it_does_not_divide(tmp_path):
    """tiny-odd (vocabulary 257, prime) at tp 2: padded to 384 rows and said so; the reference's
    losses; a checkpoint of the reference's shapes (257 rows, no padding); a text sample (the
    model can sample id 256, which is not a byte)."""
    r = paratrain("train", "--nproc", "2", "--tp", "2", "--model", "tiny-odd", "--steps", "3",
                  "--global-batch", "8", "--seq-len", "32", "--eval-every", "3", "--sample-tokens", "64",
                  "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "vocab: vocabulary 257 padded to 384 for tp=2 (192 rows per rank" in r.stdout
    assert "sampled from the trained model" in r.stdout
    state = assert_like_reference(tmp_path / "o", model="tiny-odd")
    assert state["wte.weight"].shape[0] == 257


def test_tp_must_still_divide_the_heads(tmp_path):
    r = paratrain("train", "--nproc", "3", "--tp", "3", "--model", "tiny-odd", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("paratrain: error: tp=3 does not divide the model's attention heads (4); tensor parallelism "
            "splits it evenly. Valid tp values for 'tiny-odd': [1, 2, 4].") in " ".join(r.stderr.split())
