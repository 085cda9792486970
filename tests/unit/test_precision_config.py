"""--precision / --grad-dtype / --offload-optimizer: the one rule (config.check_precision), what the
planner counts for each (bytes per parameter, host memory, the host copies), and exit 2 at the CLI."""

from __future__ import annotations

import pytest

from paratrain.config import Layout, TrainConfig, check_precision
from paratrain.errors import ConfigError
from paratrain.models.configs import get_model_config, param_count
from paratrain.plan import formulas as f
from paratrain.plan.cost import CostOptions, estimate
from paratrain.plan.hardware import get_hardware
from tests.cli.test_train_cli import paratrain


@pytest.mark.parametrize("precision,grad,offload,dp_impl,match", [
    ("fp32", "fp32", False, "bucketed", "--grad-dtype .* needs --precision bf16.*fp32 weights are their own masters"),
    ("bf16-autocast", "bf16", False, "bucketed", "autocast over fp32 weights has no masters"),
    ("fp32", None, True, "bucketed", "--offload-optimizer .* needs --precision bf16"),
    ("bf16", "fp16", False, "bucketed", "grad_dtype must be one of bf16, fp32"),
    ("bf16", "fp32", False, "naive", "--dp-impl bucketed"),
    ("fp8", None, False, "bucketed", "precision must be one of fp32, bf16, bf16-autocast"),
])
def test_bad_combinations_are_refused(precision, grad, offload, dp_impl, match):
    with pytest.raises(ConfigError, match=match):
        check_precision(precision, grad, offload, dp_impl)
    if precision != "fp8" and grad != "fp16":
        cfg = TrainConfig(precision=precision, grad_dtype=grad, offload_optimizer=offload, dp_impl=dp_impl)
        with pytest.raises(ConfigError, match=match):
            cfg.validate()


def test_good_combinations_pass():
    for grad in (None, "bf16", "fp32"):
        for offload in (False, True):
            TrainConfig(precision="bf16", grad_dtype=grad, offload_optimizer=offload,
                        layout=Layout(dp=2, zero=3), global_batch=8).validate()


def test_bytes_per_parameter():
    """[R20]'s 2 + 2 + 12 (bf16), 2 + 4 + 12 (fp32 gradients), 4 + 4 + 8 (fp32, bf16-autocast), per
    ZeRO stage; offload moves the 12 to the host."""
    psi, n = 1000.0, 4
    assert f.model_state_bytes(psi, 0, n, "bf16").as_dict() == {"params": 2000, "grads": 2000, "optimizer": 12000}
    assert f.model_state_bytes(psi, 2, n, "bf16", 4).as_dict() == {"params": 2000, "grads": 1000, "optimizer": 3000}
    assert f.model_state_bytes(psi, 3, n, "bf16-autocast").total == 16 * psi / n
    off = f.model_state_bytes(psi, 1, n, "bf16", offload=True)
    assert off.as_dict() == {"params": 2000, "grads": 2000, "optimizer": 0}
    assert f.host_state_bytes(psi, 1, n, "bf16", True) == 3000 and f.host_state_bytes(psi, 1, n, "bf16", False) == 0


def test_the_estimate_counts_gradients_and_offload():
    model, hw = get_model_config("gpt2-350m"), get_hardware("A100-80GB")
    psi = param_count(model)
    layout = Layout(dp=8, zero=1)
    base = estimate(model, layout, hw, 64, 1024, "bf16")
    fp32g = estimate(model, layout, hw, 64, 1024, "bf16", CostOptions(grad_bytes=4))
    off = estimate(model, layout, hw, 64, 1024, "bf16", CostOptions(offload_optimizer=True))
    assert fp32g.state.grads == pytest.approx(2 * base.state.grads)
    assert fp32g.comm_bytes_per_device.dp > base.comm_bytes_per_device.dp  # the reduce-scatter in fp32
    assert off.state.optimizer == 0 and off.host_bytes_per_device == pytest.approx(12 * psi / 8)
    assert off.peak_bytes_per_device == pytest.approx(base.peak_bytes_per_device - base.state.optimizer)
    # the step pays the copies over PCIe (2 B gradient down, 2 B weight up per owned parameter) and
    # AdamW in host memory
    copies = f.offload_copy_seconds(psi / 8, 2, 2, hw.host_link_bw)
    assert copies == pytest.approx(4 * psi / 8 / hw.host_link_bw)
    assert off.time.optimizer > base.time.optimizer + copies * 0.99
    assert estimate(model, layout, hw, 64, 1024, "bf16-autocast").state.total == pytest.approx(
        estimate(model, layout, hw, 64, 1024, "fp32").state.total)


def test_cpu_offload_copies_nothing():
    cpu = get_hardware("cpu")
    assert cpu.host_link_bw == 0 and f.offload_copy_seconds(1e6, 2, 2, cpu.host_link_bw) == 0
    est = estimate(get_model_config("tiny"), Layout(dp=2), cpu, 8, 32, "bf16", CostOptions(offload_optimizer=True))
    assert any("its own host" in n for n in est.notes)
    assert est.state == estimate(get_model_config("tiny"), Layout(dp=2), cpu, 8, 32, "bf16").state
    assert est.host_bytes_per_device == 0


def test_cli_refuses_with_exit_2(tmp_path):
    r = paratrain("train", "--nproc", "2", "--dp", "2", "--grad-dtype", "fp32", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs --precision bf16" in " ".join(r.stderr.split())
    r = paratrain("estimate", "--model", "tiny", "--precision", "fp32", "--offload-optimizer", cwd=tmp_path)
    assert r.returncode == 2 and "needs --precision bf16" in " ".join(r.stderr.split())
