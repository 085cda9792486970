"""`paratrain train` with a mixture of experts and expert parallelism, as a user runs it."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_train_cli import losses, paratrain
from tests.common import LOSS_RTOL


def test_ep2_from_the_cli_with_routing_flags(tmp_path):
    """--ep 2 alone starts 2 processes (the ep ranks are the dp ranks) and trains the reference's
    losses (rounding only: tests/distributed/test_expert_parallel.py) with --top-k 1 and a
    capacity factor of 1 given as flags; the records carry the router statistics; a
    checkpoint of every expert (the ranks' halves gathered back)."""
    from paratrain.checkpoint.convert import model_state
    from paratrain.config import TrainConfig
    from paratrain.reference import reference_train

    r = paratrain("train", "--model", "tiny-moe", "--ep", "2", "--top-k", "1", "--capacity-factor", "1",
                  "--steps", "3", "--global-batch", "8", "--seq-len", "32", "--eval-every", "0",
                  "--sample-tokens", "0", "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dp=2 pp=1 tp=1 ep=2 on 2 process(es)" in r.stdout
    ref = reference_train(TrainConfig(model="tiny-moe", top_k=1, capacity_factor=1.0, steps=3, global_batch=8,
                                      seq_len=32))
    assert losses(tmp_path / "o") == pytest.approx(ref.losses, rel=LOSS_RTOL)
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["router"]["tokens_per_expert"] for rec in records] == [x["tokens_per_expert"] for x in ref.router]
    state, _ = model_state(tmp_path / "o")
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.state.items()}


def test_ep_that_does_not_divide_dp_is_refused(tmp_path):
    r = paratrain("train", "--model", "tiny-moe", "--dp", "2", "--ep", "4", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert ("expert parallelism sub-divides data parallelism (the ep ranks are dp ranks), so ep must divide dp; "
            "got ep=4, dp=2.") in " ".join(r.stderr.split())
