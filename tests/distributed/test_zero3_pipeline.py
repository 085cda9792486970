"""ZeRO-3 inside a pipeline (``parallel/zero3_pipeline.py``: each stage's parameters sharded over
its dp group, gathered once per step) reproduces the single-process reference under 1F1B,
interleaved 1F1B and ZB-H1 at dp 2 x pp 2; its dp traffic is exactly the formula; the model
states it holds after a step are the planner's.

The three layouts run inside one ``run_ranks`` call (one launch of 4 processes). Tolerances:
tests/common.py. The step computes the reference's sums in the order ZeRO-1 with a pipeline does
(micro-batches accumulated whole, then one reduce-scatter over dp), so the same noise floor holds.
"""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.core.state import ModelState
from paratrain.core.traffic import zero_comm_per_step
from paratrain.plan.cost import CostOptions, estimate
from paratrain.plan.footprint import LayoutMemory
from paratrain.plan.hardware import get_hardware
from paratrain.plan.local import predict_run
from paratrain.reference import reference_train
from tests.common import BASE, LOSS_RTOL, assert_matches_reference, with_layout
from tests.harness import run_ranks

Z3PP = dict(dp=2, pp=2, zero=3, microbatches=2)
SCHEDULES = {"1f1b": dict(schedule="1f1b"), "interleaved": dict(schedule="interleaved", virtual_stages=2),
             "zb-h1": dict(schedule="zb-h1")}
CASES = {  # name: (--zero3-gather, layout)
    **{f"step-{k}": ("step", dict(Z3PP, **v)) for k, v in SCHEDULES.items()},
    **{f"microbatch-{k}": ("microbatch", dict(Z3PP, **v)) for k, v in SCHEDULES.items()},
    # ZB-V: rank 0 runs the embedding and the head, one unit (the tied weight) used by two chunks
    "microbatch-zb-v": ("microbatch", dict(Z3PP, schedule="zb-v")),
    # ZeRO-3 without a pipeline on the same 4 processes: the planner's buffers and traffic for it too
    "no-pipeline-dp4": ("microbatch", dict(dp=4, zero=3, microbatches=2)),
}
CFGS = [with_layout(BASE, **layout).replace(zero3_gather=gather) for gather, layout in CASES.values()]


def _ranks_fn(cfgs):
    from paratrain.launch import RankEnv
    from paratrain.train import evaluate, setup, train_step
    from tests.zero3_meter import TransientMeter

    out = []
    meter = TransientMeter().install()
    for cfg in cfgs:
        s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
        s.count_states = True  # the states at the optimizer (ZeRO-3 releases gradient shards at zero_grad)
        records = [train_step(s, step) for step in range(1, cfg.steps)]
        meter.reset()  # the last step's transient peak (every step's is the same)
        base = meter.now
        records.append(train_step(s, cfg.steps))
        sync = s.pm.grad_sync
        out.append({
            "losses": [r["loss"] for r in records],
            "grad_norms": [r["grad_norm"] for r in records],
            "dp_ops": {op: (o.calls, o.bytes) for op, o in s.mesh.dp.stats.ops.items()},
            "dp_wire": sum(o.wire_bytes for op, o in s.mesh.dp.stats.ops.items()
                           if op in ("reduce_scatter", "all_gather")),
            "bucket_bytes": [b.padded * 4 for b in sync.buckets],
            # a block's unit: its linear weights' gradients come in a zero-bubble W, the rest in I
            "block_bytes": [b.padded * 4 for b in sync.buckets if len(b.params) > 2],
            # ZB-V's tied weight on rank 0: one unit, used by the embedding and by the head
            "shared_bytes": [u.padded * 4 for u in sync.buckets
                             if sum(v is u for _, v in getattr(sync.gathering, "uses", ())) == 2],
            "transient": meter.peak - base,
            "pp_coord": s.mesh.coords.pp,
            "memory": s.states,
            "pieces": len(sync.grad_params),
            "full_state": s.pm.full_state_dict(),
            "val_loss": evaluate(s.pm, s.corpus, cfg, s.rows, s.device),  # the eval schedule gathers too
        })
    meter.remove()
    return out


@functools.cache
def results():
    return run_ranks(4, _ranks_fn, CFGS, timeout=240)


@functools.cache
def reference():
    return reference_train(BASE)


@functools.cache
def reference_val_loss() -> float:
    """The reference model after its steps, on the validation batches ``train.evaluate`` uses."""
    from paratrain.data import VAL, get_batch, load_corpus
    from paratrain.models.gpt import build_reference

    model = build_reference(BASE.model_config(), BASE.seed, "cpu")
    model.load_state_dict(reference().state)
    model.eval()
    val = load_corpus(BASE.data).val
    with torch.no_grad():
        losses = [model(*(torch.from_numpy(a) for a in get_batch(val, BASE.seq_len, BASE.global_batch, BASE.seed,
                                                                  i, slice(None), split=VAL))).item()
                  for i in range(BASE.eval_batches)]
    return sum(losses) / len(losses)


@pytest.mark.equivalence
@pytest.mark.parametrize("i", range(len(CFGS)), ids=list(CASES))
def test_zero3_pipeline_matches_reference(i):
    cfg, ref = CFGS[i], reference()
    assert max(ref.grad_norms) > cfg.grad_clip  # clipping was active
    ranks = [r[i] for r in results()]
    for rank, res in enumerate(ranks):
        assert_matches_reference(res, ref, cfg, state=None, who=f"{cfg.layout}, rank {rank}")
    assert_matches_reference(ranks[0], ref, cfg, state="full_state", who=f"{cfg.layout}, gathered")
    assert all(r["full_state"] is None for r in ranks[1:])
    for res in ranks:
        assert res["val_loss"] == pytest.approx(reference_val_loss(), rel=LOSS_RTOL)


@pytest.mark.parametrize("i", range(len(CFGS)), ids=list(CASES))
def test_zero3_pipeline_traffic_and_states(i):
    """dp traffic per step (zero_comm_per_step): gathered once per step, one all-gather and one
    reduce-scatter of every bucket whatever the schedule; per micro-batch, every unit gathered
    for its forward and again for its backward and reduce-scattered after its backward -- twice
    under a zero-bubble split for a block (after I, after W). After the step the model states are
    the planner's ZeRO-3 states (plan/local.predict_run; what ``train --measure-memory`` records
    is this ``model_state_bytes``), plus AdamW's 4-byte step count per piece, the 4-byte
    placeholder per unit and at most dp - 1 fp32 of padding per unit. The most loaded rank's wire
    bytes are the planner's dp communication (fp32), exactly (but per micro-batch under a split)."""
    cfg = CFGS[i]
    L = cfg.layout
    predicted = predict_run(cfg, get_hardware("cpu")).memory_per_rank
    for rank, res in enumerate(r[i] for r in results()):
        want = zero_comm_per_step(3, res["bucket_bytes"], L.microbatches, pp=L.pp, gather=cfg.zero3_gather)
        if cfg.zero3_gather == "microbatch" and L.pp > 1 and L.schedule.startswith("zb"):
            want = zero_comm_per_step(3, res["bucket_bytes"], L.microbatches, pp=L.pp, gather=cfg.zero3_gather,
                                      split_bytes=res["block_bytes"])
        for op, times in (("all_gather", 2), ("reduce_scatter", 1)):  # each use: gathered twice, reduced once
            calls, nbytes = want[op]
            want[op] = (calls + times * L.microbatches * len(res["shared_bytes"]),
                        nbytes + times * L.microbatches * sum(res["shared_bytes"]))
        got = {op: v for op, v in res["dp_ops"].items() if op not in ("metrics", "checkpoint", "eval")}
        assert got == {op: (c * cfg.steps, b * cfg.steps) for op, (c, b) in want.items()}, f"rank {rank}"
        gap = res["memory"] - ModelState.from_dict(predicted[rank])
        units = len(res["bucket_bytes"])
        assert 4 * units <= gap.params <= 4 * units + 4 * (L.dp - 1) * units, f"rank {rank}: {gap}"
        assert 0 <= gap.grads <= 4 * (L.dp - 1) * units, f"rank {rank}: {gap}"
        assert gap.optimizer == pytest.approx(4 * res["pieces"], abs=8 * (L.dp - 1) * units), f"rank {rank}: {gap}"
    # (a zero-bubble split's second reduction of a block included: core.traffic's split_bytes)
    est = estimate(cfg.model_config(), L, get_hardware("A100-80GB"), cfg.global_batch, cfg.seq_len, "fp32",
                   CostOptions(zero3_gather=cfg.zero3_gather))
    wire = max(r[i]["dp_wire"] for r in results()) / cfg.steps  # the most loaded rank's
    assert wire == pytest.approx(est.comm_bytes_per_device.dp, rel=1e-12)


@pytest.mark.parametrize("i", range(len(CFGS)), ids=list(CASES))
def test_zero3_transient_bytes_are_the_planners(i):
    """The peak, during the last step, of the bytes of gathered units and of the gradient buckets
    that live only during a backward (counted exactly as they are allocated and freed:
    tests/zero3_meter.py) is the planner's ZeRO-3 buffers of that pipeline rank
    (``plan/zero3_buffers.py``) to the byte. One known excess: under ZB-V rank 0's final-norm
    bucket (2 h fp32 bytes) is priced as kept into an F that the runtime has already reduced."""
    cfg = CFGS[i]
    L = cfg.layout
    if L.pp == 1:
        _no_pipeline_transient(cfg)
    mem = LayoutMemory(cfg.model_config(), L, cfg.global_batch, cfg.seq_len, "fp32",
                       CostOptions(zero3_gather=cfg.zero3_gather))
    slack = 2 * cfg.model_config().hidden * 4 if L.schedule == "zb-v" else 0
    for rank, res in enumerate(r[i] for r in results()):
        planned = mem.rank_memory(res["pp_coord"]).buffer_bytes
        assert planned - slack <= res["transient"] <= planned, f"rank {rank}: {res['transient']} vs {planned}"


def _no_pipeline_transient(cfg) -> None:
    """ZeRO-3 without a pipeline: every rank's peak is ``(P + G)(root + 2 block)`` (fp32: 4 + 4
    bytes; ``tiny`` has 4 blocks), the formula of plan/zero3_buffers.py's docstring, to the byte
    (dp 4 pads no unit of ``tiny``: every count is a multiple of 4). Before one reduction in
    flight it was ``4 (root + block) + 4 psi``: every unit's gradient held at a backward's end."""
    from paratrain.models.configs import block_param_count, param_count

    model = cfg.model_config()
    psi, block = param_count(model), block_param_count(model)
    root = psi - model.num_layers * block
    assert model.num_layers >= 3
    for rank, res in enumerate(r[CFGS.index(cfg)] for r in results()):
        assert res["transient"] == (4 + 4) * (root + 2 * block), f"rank {rank}"
