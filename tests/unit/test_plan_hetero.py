"""Heterogeneous devices: stages and batch shares sized to speed, a positive and sane gain."""

from __future__ import annotations

import json

import pytest

from paratrain.cli import main
from paratrain.cli.plan_args import parse_speeds
from paratrain.config import Layout
from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig
from paratrain.plan.cost import CostOptions
from paratrain.plan.hardware import get_hardware
from paratrain.plan.hetero import replica_speeds, with_speeds

MODEL = ModelConfig("m", num_layers=24, hidden=2048, num_heads=16, vocab_size=16, max_seq_len=2048)  # tiny head
A100 = get_hardware("A100-80GB")
OPTS = CostOptions()


def test_a_twice_faster_stage_gets_twice_the_layers() -> None:
    plan = with_speeds(MODEL, Layout(pp=2, microbatches=8), A100, 8, 2048, "bf16", OPTS, (1.0, 2.0))
    assert plan.stage_layers == (8, 16) and plan.even_layers == (12, 12)
    assert 1.2 < plan.gain <= 1.5 + 1e-9  # bounded by (1 + 2) / (2 x 1): the slow device alone sets the even pace


def test_a_twice_faster_replica_gets_twice_the_batch() -> None:
    plan = with_speeds(MODEL, Layout(dp=2), A100, 64, 2048, "bf16", OPTS, (1.0, 2.0))
    assert plan.batch_shares[1] / plan.batch_shares[0] == pytest.approx(2.0, rel=0.05)
    assert sum(plan.batch_shares) == pytest.approx(64)
    assert 1.2 < plan.gain <= 1.5 + 1e-9
    steps = [x.step_time_s for x in plan.aware]
    assert steps[0] == pytest.approx(steps[1], rel=0.03)  # the replicas finish together


def test_mesh_order_and_tensor_groups() -> None:
    """rank = (pp_i * dp + dp_i) * tp + tp_i; a tp group runs at its slowest member."""
    w = replica_speeds(Layout(dp=2, pp=2, tp=2), (1, 3, 2, 2, 4, 4, 1, 5))
    assert w == [(1, 4), (2, 1)]
    plan = with_speeds(MODEL, Layout(dp=2, pp=2, tp=2, microbatches=4), A100, 8, 2048, "bf16", OPTS,
                       (1, 3, 2, 2, 4, 4, 1, 5))
    assert plan.stage_speeds == (1, 1)  # the partition serves every replica: min over them


def test_equal_speeds_gain_nothing() -> None:
    plan = with_speeds(MODEL, Layout(dp=2, pp=2, microbatches=4), A100, 8, 2048, "bf16", OPTS, (2.0,) * 4)
    assert plan.gain == pytest.approx(1.0)


def test_speeds_from_catalog_names() -> None:
    h100 = get_hardware("H100-80GB")
    speeds = parse_speeds("2xH100-80GB,A100-80GB,1.5", h100, "bf16")
    assert speeds == pytest.approx((1.0, 1.0, 312 / 989, 1.5))
    with pytest.raises(ConfigError, match="device-speeds"):
        parse_speeds("1,-2", h100, "bf16")
    with pytest.raises(ConfigError, match="one positive speed per device"):
        with_speeds(MODEL, Layout(dp=2), A100, 8, 2048, "bf16", OPTS, (1.0,))


@pytest.mark.parametrize("command", ["estimate", "simulate"])
def test_cli_prints_the_gain(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, "--model", "gpt2-350m", "--pp", "2", "--dp", "2", "--microbatches", "4", "--global-batch", "16",
            "--device", "H100-80GB", "--device-speeds", "2xH100-80GB,2xA100-80GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pipeline stages sized to speed" in out and "with an even split" in out
    if command == "estimate":  # not "4 x H100-80GB": two of them are A100s
        assert "on 4 devices of speeds 1, 1, 0.315, 0.315 relative to H100-80GB" in out
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["device_speeds"]
    assert d["gain"] > 1 and d["stage_layers"][0] > d["stage_layers"][1]


def test_plan_ranks_with_speeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "gpt2-350m", "--global-batch", "16", "--device", "H100-80GB",
                 "--device-speeds", "1,1,2,2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "4 x H100-80GB" in out and "even split" in out
