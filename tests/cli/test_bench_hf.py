"""`paratrain bench --only hf` runs as a user runs it (tiny sizes, one repeat): the Hugging Face
GPT-2 under our dp and tp and under DDP and DTensor, one row each, and both sides start from the
same model (the same first loss). The speeds themselves are measured by hand (README)."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import paratrain

pytest.importorskip("transformers")


def test_bench_hf_runs_and_both_sides_train_the_same_model(tmp_path):
    r = paratrain("bench", "--only", "hf", "--model", "tiny", "--nproc", "2", "--repeats", "1", "--steps", "1",
                  "--global-batch", "2", "--seq-len", "16", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["name"] for row in rows] == ["hf-gpt2-dp2", "hf-gpt2-tp2", "hf-gpt2-tp2-sp"]
    for row in rows:
        assert row["ours_s"] > 0 and row["ref_s"] > 0
        assert row["ratio"] == pytest.approx(row["ref_s"] / row["ours_s"])
        # the same weights and batch on both sides: the first losses agree to float rounding
        # (1e-5 relative: the LOSS_RTOL of tests/common.py; a wrongly permuted q/k/v or a
        # Conv1D weight not transposed moves it by far more)
        assert row["first_loss_ours"] == pytest.approx(row["first_loss_ref"], rel=1e-5)


def test_bench_hf_without_transformers_is_exit_2(tmp_path, monkeypatch):
    import importlib.util

    from paratrain.cli import bench
    from paratrain.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'paratrain\[hf\]'"):
        bench._check_hf()
