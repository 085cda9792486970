"""Tensor parallelism (with and without sequence parallelism, alone and under data parallelism)
reproduces the single-process reference: losses, gradient norms, clipped gradients, every
parameter gathered back to full shape, and exactly the communication its formula states."""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.parallel.shard import shard
from paratrain.parallel.volume import tp_comm_per_step
from paratrain.reference import reference_train
from tests.common import BASE, max_param_diff, train_ranks_fn, with_layout
from tests.distributed.test_data_parallel import LOSS_RTOL, NORM_RTOL
from tests.harness import run_ranks

# Tolerances (fp32, CPU). A tp rank computes each matmul over a slice of the contracted
# dimension (row-parallel layers) or of the vocabulary (the loss's sum of exponentials), and the
# all-reduce adds the slices in another order, so every value differs from the reference by float
# rounding only: gradients within ~5e-7 of each tensor's largest element; measured over all cases
# below, losses within 2.1e-7 and pre-clip norms within 1.8e-6 relative, hence LOSS_RTOL /
# NORM_RTOL = 1e-5 as for data parallelism. (Clipping is active at every step: norms 2.3 to 8.4.) Parameters: AdamW's
# step lr * m / (sqrt(v) + eps) is ~lr * sign(g) for any |g| >> eps = 1e-8, so where a gradient
# element is itself ~1e-9 (a few in every large matrix; measured: each element off by > 3e-6 had
# |g| < 5e-9 at step 1 while the matrix's largest is ~5e-3) its ~1e-10 rounding error changes the
# step by a visible fraction of lr. Measured worst: 2.3e-5 (single elements of fc1/fc2 weights).
# TP_PARAM_ATOL = 1e-4 is 30 x below lr = 3e-3, the change a wrong shard, reduction or scale
# causes (and it moves many elements: each tensor's relative L2 difference must also stay below
# 2e-4, see tests/common.py).
TP_PARAM_ATOL = 1e-4

# How the reference tensors are split over tp: (dim, chunks), see parallel/shard.py. Written out
# here, independently of the code, as the test's statement of the layout.
SPLITS = {"attn.qkv.weight": (0, 3), "attn.qkv.bias": (0, 3), "mlp.fc1.weight": (0, 1),
          "mlp.fc1.bias": (0, 1), "attn.proj.weight": (1, 1), "mlp.fc2.weight": (1, 1),
          "wte.weight": (0, 1), "lm_head.weight": (0, 1)}

CASES = {
    "tp2": dict(tp=2),
    "tp4": dict(tp=4),
    "dp2-tp2": dict(dp=2, tp=2),
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "tp4-sp": dict(tp=4, sequence_parallel=True),
    "dp2-tp2-sp-accum2": dict(dp=2, tp=2, sequence_parallel=True, microbatches=2),
    "tp2-recompute-full": dict(tp=2, recompute="full"),
    "tp2-sp-recompute-selective": dict(tp=2, sequence_parallel=True, recompute="selective"),
    "tp2-sp-recompute-full": dict(tp=2, sequence_parallel=True, recompute="full"),
}
UNTIED = {"tp2-untied": dict(tp=2), "tp2-sp-untied": dict(tp=2, sequence_parallel=True)}


def case_config(name: str):
    if name in UNTIED:
        return with_layout(BASE.replace(untie_embeddings=True), **UNTIED[name])
    return with_layout(BASE, **CASES[name])


@functools.cache
def reference(cfg):
    return reference_train(cfg)


@functools.cache
def run(name: str):
    """The ranks' results for one case (cached: the comm test reuses the equivalence runs)."""
    cfg = case_config(name)
    return cfg, run_ranks(cfg.layout.world_size, train_ranks_fn, cfg)


def expected_local(ref_state: dict, rank_tp: int, tp: int) -> dict:
    out = {}
    for k, v in ref_state.items():
        spec = next((s for suffix, s in SPLITS.items() if k.endswith(suffix)), None)
        out[k] = v if spec is None else shard(v, rank_tp, tp, *spec)
    return out


@pytest.mark.parametrize("name", [*CASES, *UNTIED])
def test_tp_matches_reference(name):
    cfg, results = run(name)
    layout = cfg.layout
    ref = reference(cfg.replace(layout=BASE.layout))
    assert max(ref.grad_norms) > cfg.grad_clip  # clipping was active
    for rank, res in enumerate(results):
        assert res["losses"] == pytest.approx(ref.losses, rel=LOSS_RTOL), f"rank {rank} losses"
        assert res["grad_norms"] == pytest.approx(ref.grad_norms, rel=NORM_RTOL), f"rank {rank} grad norms"
        # every rank holds exactly its documented shard of every reference tensor
        diff, where = max_param_diff(res["state"], expected_local(ref.state, rank % layout.tp, layout.tp))
        assert diff <= TP_PARAM_ATOL, f"rank {rank}: max |shard - reference shard| = {diff:.3g} at {where}"
    # ... and rank 0 gathers them back into the reference's full state dict
    full = results[0]["full_state"]
    diff, where = max_param_diff(full, ref.state)
    assert diff <= TP_PARAM_ATOL, f"gathered state: max |param - reference| = {diff:.3g} at {where}"
    assert all(r["full_state"] is None for r in results[1:])
    if not cfg.untie_embeddings:
        assert torch.equal(full["lm_head.weight"], full["wte.weight"])


@pytest.mark.parametrize("name", ["tp2", "tp2-sp", "dp2-tp2-sp-accum2", "tp2-recompute-full",
                                  "tp2-sp-recompute-selective", "tp2-sp-recompute-full"])
def test_tp_comm_bytes_match_formula(name):
    cfg, results = run(name)
    layout = cfg.layout
    expected = tp_comm_per_step(cfg.model_config(), layout.tp, layout.sequence_parallel,
                                cfg.global_batch // layout.dp, cfg.seq_len, layout.microbatches,
                                layout.recompute)
    for rank, res in enumerate(results):
        per_step_total = sum(b for _, b in expected.values())
        assert [s["tp"] for s in res["comm_bytes"]] == [per_step_total] * cfg.steps, f"rank {rank}"
        measured = {op: (s["calls"], s["bytes"]) for op, s in res["ops"]["tp"].items() if op != "checkpoint"}
        assert measured == {op: (c * cfg.steps, b * cfg.steps) for op, (c, b) in expected.items()}, f"rank {rank}"


def clipped_grads_fn(cfg, clip: float):
    """One step's gradients after clipping, gathered to full shapes (on global rank 0)."""
    from paratrain.data import get_batch, load_corpus
    from paratrain.launch import RankEnv
    from paratrain.parallel.shard import gather_full_state
    from paratrain.train import setup

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"), load_corpus())
    x, y = get_batch(s.corpus.train, cfg.seq_len, cfg.global_batch, cfg.seed, 1, s.rows)
    s.pm.forward_backward(torch.from_numpy(x), torch.from_numpy(y))
    norm = s.pm.clip_grad_norm_(clip)
    grads = gather_full_state(s.pm.module, s.mesh.tp, grads=True) if s.mesh.coords.dp == 0 else None
    return float(norm), grads


def reference_clipped_grads(cfg, clip: float):
    from paratrain.data import get_batch, load_corpus
    from paratrain.models.gpt import build_reference

    model = build_reference(cfg.model_config(), cfg.seed)
    x, y = get_batch(load_corpus().train, cfg.seq_len, cfg.global_batch, cfg.seed, 1)
    model(torch.from_numpy(x), torch.from_numpy(y)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return float(norm), {k: p.grad for k, p in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("layout", [dict(tp=2), dict(dp=2, tp=2, sequence_parallel=True)],
                         ids=["tp2", "dp2-tp2-sp"])
def test_clipping_counts_each_parameter_once(layout):
    """The clipped gradients equal the reference's with a clip value that really clips (the
    coefficient is ~0.04): a replicated parameter counted twice, or a shard counted once, would
    change the norm and with it every clipped gradient."""
    cfg = with_layout(BASE, **layout)
    ref_norm, ref_grads = reference_clipped_grads(cfg, clip=0.3)
    results = run_ranks(cfg.layout.world_size, clipped_grads_fn, cfg, 0.3)
    assert 0.3 / ref_norm < 0.5
    for norm, _ in results:
        assert norm == pytest.approx(ref_norm, rel=NORM_RTOL)
    grads = results[0][1]
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        # rounding only (see above); atol for the ~1e-9 noise of the mathematically-zero key bias
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
