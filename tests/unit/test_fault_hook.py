"""The fault-injection hook: parsed once from PARATRAIN_FAULT, passed to the loop, never read per step."""

from __future__ import annotations

import pytest
import torch

from paratrain.errors import ConfigError
from paratrain.launch import RankEnv
from paratrain.train import FAULT_ENV, Fault, setup, train_step
from tests.common import BASE


@pytest.mark.parametrize("spec, want", [("1:3", Fault(1, 3)), ("0:12:hang", Fault(0, 12, hang=True))])
def test_parse(spec: str, want: Fault) -> None:
    assert Fault.from_env({FAULT_ENV: spec}) == want


def test_unset_is_no_hook() -> None:
    assert Fault.from_env({}) is None and Fault.from_env({FAULT_ENV: ""}) is None


@pytest.mark.parametrize("spec", ["1", "a:3", "1:3:stop", "1:-2", "1:2:hang:x", "1:"])
def test_bad_spec_says_what_is_valid(spec: str) -> None:
    with pytest.raises(ConfigError, match="RANK:STEP or RANK:STEP:hang"):
        Fault.from_env({FAULT_ENV: spec})


def test_fires_on_its_rank_and_step_only() -> None:
    fault = Fault(1, 3)
    fault(0, 3)
    fault(1, 2)
    with pytest.raises(RuntimeError, match="injected fault on rank 1 at step 3"):
        fault(1, 3)


def test_the_loop_runs_the_sessions_hook_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_step calls the hook it was given with (rank, step) before the step; the variable
    alone does nothing to a session built without it (no hidden channel)."""
    monkeypatch.setenv(FAULT_ENV, "0:1")
    calls: list[tuple[int, int]] = []
    s = setup(BASE, RankEnv.from_env(), torch.device("cpu"), on_step=lambda r, step: calls.append((r, step)))
    train_step(s, 1)
    train_step(s, 2)
    assert calls == [(0, 1), (0, 2)]
    s.on_step = Fault(0, 3)
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at step 3"):
        train_step(s, 3)
