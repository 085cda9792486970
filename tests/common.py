"""Shared pieces of the multi-process tests: a small config, rank functions, comparisons."""

from __future__ import annotations

from typing import Any

import torch

from paratrain.config import Layout, TrainConfig
from paratrain.reference import ReferenceRun

# Small enough for a few seconds per layout, large enough to exercise every code path.
BASE = TrainConfig(model="tiny", steps=5, global_batch=8, seq_len=32, lr=3e-3, warmup_steps=2,
                   grad_clip=1.0, eval_every=0, sample_tokens=0, checkpoint=False, progress=False)


def with_layout(cfg: TrainConfig, **layout: Any) -> TrainConfig:
    return cfg.replace(layout=Layout(**layout))


def train_ranks_fn(cfg: TrainConfig) -> dict[str, Any]:
    """Runs on every rank under tests.harness.run_ranks: the production setup and step."""
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    records = [train_step(s, step) for step in range(1, cfg.steps + 1)]
    timeline = s.pm.gather_timeline() if cfg.layout.pp > 1 else None  # of the last step, on rank 0
    return {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "comm_bytes": [r["comm_bytes"] for r in records],
        "state": {k: v.detach().clone() for k, v in s.pm.module.state_dict().items()},
        "full_state": s.pm.full_state_dict(),
        "ops": {g.name: g.stats.as_dict() for g in s.mesh.groups if g.size > 1},
        "timeline": timeline.to_json() if timeline is not None else None,
        "dp_bucket_bytes": _bucket_bytes(s.pm.grad_sync),
    }


def _bucket_bytes(sync: Any) -> int:
    """The padded bytes of the gradient buckets of the ZeRO sync under ``sync`` (0 without one)."""
    from paratrain.parallel.model import sync_chain
    from paratrain.parallel.zero import ZeroDataParallel

    zero = [z for z in sync_chain(sync) if isinstance(z, ZeroDataParallel)]
    return sum(b.padded * b.flat.new_empty((), dtype=b.dtype).element_size() for z in zero for b in z.buckets)


# Tolerances of every equivalence test against the single-process reference, as multiples of the
# noise floor: how far the fp32 reference itself moves under legal float reordering. Measured with
# benchmarks/noise_floor.py (which prints these figures) on the six references the tests train
# (tiny, tiny untied, tiny-odd, tiny-odd untied, tiny-deep, tiny at batch 12; BASE's 5 steps,
# lr 3e-3), each in fp32 under two kernel sets -- the machine's AVX-512 and
# MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 -- and in fp64; "floor" below is the worst
# over references and both comparisons (fp32 vs fp64, AVX-512 vs AVX2). A parallel run reorders
# the same sums (dp partial gradients, tp slices, micro-batches, shards), so it must land within a
# small multiple of that floor; measured (--parallel, both kernel sets) it does, at <= 1x.
#
# Losses: floor 9.4e-7 relative (tiny-deep), parallel runs <= 3.1e-7; LOSS_RTOL is 10x the floor.
# A forward that is wrong (a missing tp all-reduce, a wrong shard) moves the loss by percents, a
# wrong update the next steps' losses by >> 1e-5 (one dp rank's gradients dropped: 5e-2 at step 3).
LOSS_RTOL = 1e-5
# Pre-clip gradient norms: at step 1 every run starts from bit-identical parameters and the norm
# differs by the rounding of one backward only: floor 2.0e-7, so FIRST_NORM_RTOL is 50x it. From
# step 2 on, AdamW has turned rounding noise of near-zero gradient elements into parameter
# differences (below), the runs are no longer at the same point, and the floor grows with each step:
# 3.2e-5 at step 5 of tiny-deep (its 8 blocks; <= 1.2e-6 for the 4-block models); NORM_RTOL is 6x
# it. The norm is what catches a wrong gradient scale (a sum not divided by dp, a missing 1/m):
# AdamW is invariant to a constant scale and clipping hides it, so losses and parameters would
# match, but the norm moves by the factor (>= 1.5 for any wrong dp or m) -- and a parameter counted
# twice (or a shard counted once) moves the step-1 norm by >> 1e-5.
FIRST_NORM_RTOL = 1e-5
NORM_RTOL = 2e-4
# Parameters: absolute, in units of the peak learning rate, not relative to the tensor (a bias that
# starts at zero and whose gradient is nearly zero -- the attention key bias, mathematically zero --
# has a tiny norm, so a relative norm of it measures rounding noise against nothing). AdamW moves
# every element by lr * m / (sqrt(v) + eps), i.e. up to ~lr per step whatever the gradient's size,
# so where a gradient element is ~1e-9 (a few in every matrix) its rounding error flips part of a
# step: floor 1.2e-2 lr (single elements of fc1/fc2 and the untied embedding; 3.7e-5 at lr 3e-3),
# parallel runs <= 9.7e-3 lr. PARAM_ATOL_LR = 0.1 is 8x the floor and a tenth of one step: a wrong
# shard, a dropped rank's gradient or a mis-assigned bucket slice changes the affected elements'
# steps by O(lr) each (tests/distributed/test_tolerances.py breaks the dp reduction on purpose:
# 2.0 lr for one small slice of one rank's gradients dropped, 5.2 lr for a whole rank's).
PARAM_ATOL_LR = 0.1
# Gradients after one step's clipping, elementwise (|g - g_ref| <= GRAD_ATOL + GRAD_RTOL |g_ref|):
# the floor of one backward is ~1e-7 of each tensor's largest element; GRAD_ATOL covers the ~1e-9
# noise of the mathematically-zero key bias. Double-counting in the clip coefficient moves every
# clipped gradient by the same relative amount, >> 1e-4.
GRAD_RTOL = 1e-4
GRAD_ATOL = 1e-7


def param_atol(cfg: TrainConfig) -> float:
    """The absolute parameter tolerance of a run of ``cfg``: PARAM_ATOL_LR x its peak lr."""
    return PARAM_ATOL_LR * cfg.lr


def max_param_diff(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest element-wise |state - ref| over all tensors (and where). Also asserts equal names
    and shapes."""
    assert set(state) == set(ref), f"parameter names differ: {set(state) ^ set(ref)}"
    worst, name = 0.0, ""
    for k, v in ref.items():
        assert state[k].shape == v.shape, f"{k}: shape {tuple(state[k].shape)} != {tuple(v.shape)}"
        d = (state[k].double() - v.double()).abs().max().item() if v.numel() else 0.0
        if d > worst:
            worst, name = d, k
    return worst, name


def _worst_rel(xs: list[float], refs: list[float]) -> tuple[float, int]:
    """max_i |x_i - r_i| / |r_i| and its step (1-based)."""
    assert len(xs) == len(refs), f"{len(xs)} values, the reference has {len(refs)}"
    rels = [abs(x - r) / max(abs(r), 1e-30) for x, r in zip(xs, refs)]
    i = max(range(len(rels)), key=rels.__getitem__)
    return rels[i], i + 1


def reference_failures(losses: list[float], grad_norms: list[float] | None, state: dict[str, torch.Tensor] | None,
                       ref: ReferenceRun, cfg: TrainConfig) -> list[str]:
    """Every way a run differs from the reference ``ref`` (of the same steps) beyond
    the tolerances above; [] if it matches. ``grad_norms`` / ``state`` None: not compared."""
    out = []
    rel, step = _worst_rel(losses, ref.losses)
    if rel > LOSS_RTOL:
        out.append(f"losses: relative difference {rel:.3g} at step {step} > {LOSS_RTOL}")
    if grad_norms is not None:
        first, _ = _worst_rel(grad_norms[:1], ref.grad_norms[:1])
        if first > FIRST_NORM_RTOL:
            out.append(f"grad norms: relative difference {first:.3g} at step 1 > {FIRST_NORM_RTOL}")
        rel, step = _worst_rel(grad_norms, ref.grad_norms)
        if rel > NORM_RTOL:
            out.append(f"grad norms: relative difference {rel:.3g} at step {step} > {NORM_RTOL}")
    if state is not None:
        diff, where = max_param_diff(state, ref.state)
        if diff > param_atol(cfg):
            out.append(f"parameters: max |param - reference| = {diff:.3g} ({diff / cfg.lr:.3g} lr) at {where} "
                       f"> {param_atol(cfg):.3g} ({PARAM_ATOL_LR} lr)")
    return out


def assert_matches_reference(res: dict[str, Any], ref: ReferenceRun, cfg: TrainConfig, state: str | None = "state",
                             who: str = "") -> None:
    """``res`` (a train_ranks_fn result) has the reference's losses, pre-clip gradient norms and,
    unless ``state`` is None, parameters ``res[state]``, within the tolerances above."""
    failures = reference_failures(res["losses"], res["grad_norms"], res[state] if state else None, ref, cfg)
    assert not failures, (f"{who}: " if who else "") + "; ".join(failures)


# --precision bf16 (bf16 weights, fp32 masters; parallel/mixed.py) against the single-process bf16
# reference (paratrain/reference.py), measured with benchmarks/noise_floor_bf16.py --parallel:
# * kernel sets: the bf16 reference is bit-identical under AVX-512 and AVX2 (loss 1.9e-7, norms and
#   parameters 0): bf16 matmuls go through oneDNN, whose kernels these variables do not switch, and
#   each result is rounded to bf16. The floor is the layouts' own reordering instead: a dp rank's
#   gradient, a tp partial sum or a micro-batch's gradient is rounded to bf16 before it is summed
#   (2^-9 relative per element), where the reference rounds the whole sum once.
# * that reordering, 5 steps of tiny (worst over dp2, ZeRO 1/2/3, tp2-sp, pp2 1f1b/interleaved, the
#   dp2-pp2-tp2 3D case): losses 4.0e-4, step-1 norm 5.5e-4, norms 4.6e-3 (the tp2 cases: their
#   activations are all-reduced in bf16; dp/ZeRO/pp <= 1.8e-4, 1.3e-4, 1.3e-3). bf16 against fp32
#   is of the same size (losses 2.8e-4, norms 1.7e-3): no tolerance here can tell "bf16 computed in
#   another order" from "fp32"; what these catch is a wrong reduction, shard or scale.
# BF16_LOSS_RTOL 2.5x the worst: one dp rank's gradients dropped moves the losses by 5e-2 (fp32,
# test_tolerances.py). BF16_FIRST_NORM_RTOL 5x: a parameter counted twice or a shard once moves
# the step-1 norm by >> 1e-2. BF16_NORM_RTOL 2x: a wrong dp or micro-batch scale moves it >= 1.5x.
BF16_LOSS_RTOL = 1e-3
BF16_FIRST_NORM_RTOL = 3e-3
BF16_NORM_RTOL = 1e-2
# Parameters: AdamW's first step is lr * sign(g), and an element whose gradient is rounding noise
# (the key bias's, mathematically zero; a few per matrix) moves by up to ~lr per step in a random
# direction, so a largest-difference bound as fp32's PARAM_ATOL_LR would be ~3 lr and catch
# nothing. Counted instead: the *fraction* of a tensor's elements whose bf16 weights differ by more
# than one bf16 ulp (two nearly equal masters may round apart) plus BF16_PARAM_ATOL_LR lr. Measured
# <= 0.39% (tp2-sp; dp/ZeRO/pp <= 0.03%; the key third of qkv.bias, pure noise, left out);
# BF16_PARAM_FRACTION 2%: a wrong shard or a dropped slice changes all the elements it touches.
BF16_PARAM_ATOL_LR = 0.5
BF16_PARAM_FRACTION = 0.02
BF16_VS_FP32_LOSS_RTOL = 2e-3  # bf16 vs the fp32 reference: 4.0e-4 measured (tiny, 5 steps)


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place of each element of ``t`` (8 significant bits): the gap to
    the next bf16 value of larger magnitude."""
    t = t.double().abs()
    exp = torch.floor(torch.log2(t.clamp_min(2.0 ** -126)))
    return torch.pow(2.0, exp - 7)


def bf16_param_excess(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                      atol: float = 0.0) -> tuple[float, str]:
    """Largest over tensors of the fraction of elements with ``|p - p_ref| > ulp(p_ref) + atol``
    (and which tensor); ``atol`` 0 and the largest excess instead when ``atol`` is None. The key
    bias (the middle third of ``attn.qkv.bias``, or Hugging Face GPT-2's ``attn.c_attn.bias``: its
    gradient is mathematically zero) is left out."""
    worst, name = 0.0, ""
    for k, v in ref.items():
        a, b = state[k].double(), v.double()
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not v.numel():
            continue
        excess = ((a - b).abs() - bf16_ulp(b)).clamp_min(0)
        if k.endswith(("attn.qkv.bias", "attn.c_attn.bias")):  # ours; Hugging Face GPT-2's fused [q; k; v]
            n = excess.numel() // 3
            excess = torch.cat([excess[:n], excess[2 * n:]])
        d = excess.max().item() if atol is None else (excess > atol).double().mean().item()
        if d > worst:
            worst, name = d, k
    return worst, name


def bf16_failures(res: dict[str, Any], ref: ReferenceRun, cfg: TrainConfig, state: str = "full_state") -> list[str]:
    """Every way a bf16 run differs from the bf16 reference beyond the BF16_* tolerances."""
    out = []
    rel, step = _worst_rel(res["losses"], ref.losses)
    if rel > BF16_LOSS_RTOL:
        out.append(f"losses: relative difference {rel:.3g} at step {step} > {BF16_LOSS_RTOL}")
    first, _ = _worst_rel(res["grad_norms"][:1], ref.grad_norms[:1])
    if first > BF16_FIRST_NORM_RTOL:
        out.append(f"grad norms: relative difference {first:.3g} at step 1 > {BF16_FIRST_NORM_RTOL}")
    rel, step = _worst_rel(res["grad_norms"], ref.grad_norms)
    if rel > BF16_NORM_RTOL:
        out.append(f"grad norms: relative difference {rel:.3g} at step {step} > {BF16_NORM_RTOL}")
    if res.get(state) is not None:
        frac, where = bf16_param_excess(res[state], ref.state, BF16_PARAM_ATOL_LR * cfg.lr)
        if frac > BF16_PARAM_FRACTION:
            out.append(f"parameters: {frac:.2%} of {where} differ by more than one bf16 ulp + "
                       f"{BF16_PARAM_ATOL_LR} lr (> {BF16_PARAM_FRACTION:.0%})")
    return out
