"""--precision bf16 (bf16 weights, gradients and activations; fp32 master weights and AdamW state:
parallel/mixed.py) in every layout family against the single-process bf16 reference, and the bf16
run against fp32. Several layouts share one process launch (``run_layouts``): the test-time budget."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from paratrain.config import TrainConfig
from paratrain.reference import reference_train
from tests.common import BASE, bf16_failures, train_ranks_fn, with_layout
from tests.harness import run_ranks

BF16 = BASE.replace(precision="bf16")
# name -> (layout, other changes): every layout family, both gradient dtypes, with and without offload
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "dp2": (dict(dp=2), {}),
    "dp2-offload": (dict(dp=2, microbatches=2), dict(offload_optimizer=True)),
    "z1-dp2-mb2": (dict(dp=2, zero=1, microbatches=2), {}),
    "z2-dp2-mb2-fp32grad-offload": (dict(dp=2, zero=2, microbatches=2), dict(grad_dtype="fp32", offload_optimizer=True)),
    "z3-dp2-fp32grad": (dict(dp=2, zero=3), dict(grad_dtype="fp32")),
    "tp2-sp": (dict(tp=2, sequence_parallel=True), {}),
    "pp2-1f1b": (dict(pp=2, microbatches=4, schedule="1f1b"), dict(grad_dtype="fp32")),
    "pp2-interleaved": (dict(pp=2, microbatches=2, schedule="interleaved", virtual_stages=2), {}),
    "z1-dp2-pp2-tp2-sp": (dict(dp=2, pp=2, tp=2, zero=1, microbatches=2, sequence_parallel=True), {}),
}
LAYOUTS = {2: [n for n in CASES if n != "z1-dp2-pp2-tp2-sp"], 8: ["z1-dp2-pp2-tp2-sp"]}


def config(name: str) -> TrainConfig:
    layout, changes = CASES[name]
    return with_layout(BF16, **layout).replace(**changes)


def reference_of(name: str) -> str:
    """The reference (benchmarks/noise_floor_bf16.py's names) a case is compared with."""
    return "tiny"


def _layouts_fn(cfgs: list[TrainConfig]) -> list[dict[str, Any]] | None:
    """On every rank: train each config in turn (one launch); rank 0 returns what is compared."""
    import torch.distributed as dist

    out = []
    for cfg in cfgs:
        res = train_ranks_fn(cfg)
        out.append({k: res[k] for k in ("losses", "grad_norms", "full_state", "comm_bytes")})
    return out if dist.get_rank() == 0 else None


def run_layouts(world: int, names: list[str]) -> list[dict[str, Any]]:
    return run_ranks(world, _layouts_fn, [config(n) for n in names], timeout=300)[0]


@functools.cache
def reference(precision: str) -> Any:
    return reference_train(BASE.replace(precision=precision))


@functools.cache
def results(world: int) -> dict[str, dict[str, Any]]:
    return dict(zip(LAYOUTS[world], run_layouts(world, LAYOUTS[world])))


@pytest.mark.equivalence
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_bf16_layouts_match_the_bf16_reference(world):
    ref, fp32 = reference("bf16"), reference("fp32")
    assert max(ref.grad_norms) > BASE.grad_clip  # clipping was active
    failures = []
    for name, res in results(world).items():
        assert res["full_state"]["wte.weight"].dtype == torch.bfloat16, name
        failures += [f"{name}: {f}" for f in bf16_failures(res, ref, BF16)]
        # bf16 against fp32 (BF16_VS_FP32_LOSS_RTOL in tests/common.py)
        from tests.common import BF16_VS_FP32_LOSS_RTOL

        rel = max(abs(a - b) / b for a, b in zip(res["losses"], fp32.losses))
        if not 0 < rel <= BF16_VS_FP32_LOSS_RTOL:
            failures.append(f"{name}: losses {rel:.3g} from fp32's, not in (0, {BF16_VS_FP32_LOSS_RTOL}]")
    assert not failures, "; ".join(failures)
