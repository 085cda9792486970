"""The planner follows ``--zero3-gather`` for ZeRO-3 inside a pipeline (pure: no torch): once per
step it prices ZeRO-1's traffic and the rank's whole parameters and gradients as buffers; per
micro-batch ZeRO-3's 3 m psi and one unit; ``paratrain estimate`` takes the flag; the runtime
implements both, so the search keeps them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from paratrain.config import Layout, TrainConfig, runtime_implements
from paratrain.core import traffic
from paratrain.errors import ConfigError
from paratrain.models.configs import get_model_config
from paratrain.plan.cost import CostOptions, estimate
from paratrain.plan.footprint import LayoutMemory
from paratrain.plan.hardware import get_hardware
from tests.cli.test_train_cli import paratrain

MODEL = get_model_config("small")
HW = get_hardware("A100-80GB")
Z3PP = Layout(dp=4, pp=2, zero=3, microbatches=8)


def _estimate(layout: Layout, gather: str = "microbatch"):
    return estimate(MODEL, layout, HW, 32, 256, "fp32", CostOptions(zero3_gather=gather))


def test_traffic_follows_the_gather_mode():
    """step: exactly ZeRO-1's collectives (the all-gather before the schedule instead of after the
    optimizer step); microbatch: ZeRO-3's without a pipeline, 3 m psi."""
    assert traffic.dp_parts(3, 8, 4, 4, 4, pp=2, gather="step") == traffic.dp_parts(1, 8, 4, 4, 4)
    assert traffic.dp_parts(3, 8, 4, 4, 4, pp=2) == traffic.dp_parts(3, 8, 4, 4, 4)
    assert traffic.dp_parts(3, 8, 4, 4, 4, pp=1, gather="step") == traffic.dp_parts(3, 8, 4, 4, 4)  # no pipeline
    assert traffic.zero_comm_per_step(3, [100, 60], 8, pp=2, gather="step") == traffic.zero_comm_per_step(1, [100, 60])
    step, per_mb = _estimate(Z3PP, "step"), _estimate(Z3PP)
    assert step.comm_bytes_per_device.dp == _estimate(dataclasses.replace(Z3PP, zero=1)).comm_bytes_per_device.dp
    assert per_mb.comm_bytes_per_device.dp == pytest.approx(1.5 * 8 * step.comm_bytes_per_device.dp, rel=1e-12)


@pytest.mark.parametrize("gather", ["step", "microbatch"])
def test_memory_follows_the_gather_mode(gather):
    """Model states are ZeRO-3's either way; the buffers are the rank's whole (P + G) params when
    gathered per step; per micro-batch under 1F1B (small: 3 blocks a rank) two blocks whole (the
    one in use, the one prefetched) and two blocks' gradient buckets (one filling, one being
    reduced), what the runtime holds (plan/zero3_buffers.py; measured to the byte in
    tests/distributed/test_zero3_pipeline.py)."""
    mem = LayoutMemory(MODEL, Z3PP, 32, 256, "fp32", CostOptions(zero3_gather=gather))
    for i in range(Z3PP.pp):
        rank = mem.rank_memory(i)
        whole = 8 * rank.params  # P + G = 4 + 4 bytes
        assert rank.state.total == pytest.approx(16 * rank.params / Z3PP.dp)
        assert rank.buffer_bytes == (whole if gather == "step" else 2 * 8 * mem.block)
    est = _estimate(Z3PP, gather)
    assert est.peak_bytes_per_device == pytest.approx(mem.peak_bytes())
    assert est.buffer_bytes == max(mem.rank_memory(i).buffer_bytes for i in range(Z3PP.pp))


def test_the_runtime_implements_zero3_with_a_pipeline():
    """Every valid dense layout; a mixture of experts refuses ZeRO-3 with a pipeline (exit 2)."""
    assert runtime_implements(Z3PP) and runtime_implements(Z3PP, MODEL)
    TrainConfig(model="small", global_batch=32, seq_len=256, layout=Z3PP, zero3_gather="step").validate()
    moe = get_model_config("tiny-moe")
    assert not runtime_implements(Layout(dp=2, pp=2, zero=3), moe) and runtime_implements(Layout(dp=2, zero=3), moe)
    with pytest.raises(ConfigError, match="does not implement ZeRO-3 with pipeline parallelism yet"):
        TrainConfig(model="tiny-moe", global_batch=8, seq_len=32, layout=Layout(dp=2, pp=2, zero=3, microbatches=2)
                    ).validate()
    with pytest.raises(ConfigError, match="zero3_gather must be one of microbatch, step, got 'block'"):
        TrainConfig(layout=Z3PP, zero3_gather="block").validate()


def test_estimate_takes_the_flag(tmp_path):
    args = ["estimate", "--model", "small", "--dp", "4", "--pp", "2", "--zero", "3", "--microbatches", "8",
            "--global-batch", "32", "--seq-len", "256", "--hardware", "A100-80GB", "--precision", "fp32", "--json"]
    out = {g: json.loads(paratrain(*args, "--zero3-gather", g, cwd=tmp_path).stdout) for g in ("step", "microbatch")}
    assert out["step"]["comm_bytes_per_device"]["dp"] < out["microbatch"]["comm_bytes_per_device"]["dp"]
    assert out["step"]["comm_bytes_per_device"]["dp"] == _estimate(Z3PP, "step").comm_bytes_per_device.dp


def test_train_flag_and_config_key(tmp_path):
    """`train --zero3-gather step` and a config file's ``zero3_gather`` / ``zero3-gather`` reach the
    TrainConfig; the default is microbatch."""
    import argparse

    from paratrain.cli.common import add_train_args, build_train_config, load_config_file

    p = argparse.ArgumentParser()
    add_train_args(p)
    assert build_train_config(p.parse_args([])).zero3_gather == "microbatch"
    assert build_train_config(p.parse_args(["--zero3-gather", "step"])).zero3_gather == "step"
    (tmp_path / "c.json").write_text('{"zero3-gather": "step"}')
    assert build_train_config(p.parse_args([]), load_config_file(str(tmp_path / "c.json"))).zero3_gather == "step"


def test_pending_after_i_is_the_whole_schedules_answer_beyond_the_cap() -> None:
    """plan/zero3_buffers.pending_after_i reads at most 4p + 4 micro-batches of the schedule (a
    million-micro-batch schedule took minutes: `plan --global-batch 1000000000`); beyond that the
    whole schedule gives the same answer on every rank. Catches a cap below the warm-up."""
    from paratrain.core.schedules import build_schedule
    from paratrain.plan.zero3_buffers import pending_after_i

    def whole(schedule: str, p: int, m: int, v: int, placement: str, rank: int) -> bool:
        kept = False
        for a in build_schedule(schedule, p, m, v, placement).ranks[rank]:
            if a.is_compute:
                if a.kind == "F" and kept:
                    return True
                kept = a.kind == "I" if a.kind != "F" else kept
        return False

    for schedule, v, placement in (("zb-h1", 1, "loop"), ("zb-v", 2, "v")):
        for p in (2, 3, 4):
            for m in range(4 * p + 4, 6 * p + 1):
                for r in range(p):
                    assert pending_after_i(schedule, p, m, v, placement, r) == whole(schedule, p, m, v, placement, r)
