"""Expert parallelism (experts sharded over the ep ranks, tokens exchanged by all-to-all,
``parallel/expert.py``) against the single-process mixture-of-experts reference."""

from __future__ import annotations

import functools

import pytest
import torch

from paratrain.config import Layout
from paratrain.core.traffic import ep_comm_per_step
from paratrain.models.configs import param_count
from paratrain.reference import ReferenceRun, reference_train
from tests.common import BASE, LOSS_RTOL, assert_matches_reference, with_layout
from tests.harness import run_ranks

# Tolerances: tests/common.py. An ep rank routes its own sequences exactly as the reference does
# (routing groups are whole sequences), and each row's expert MLP is the reference's: only the
# rows' grouping into matrix products, the dp sum of the non-expert gradients and the edp sum of
# the experts' differ, i.e. float reordering. The routing itself is discrete (top-k, capacity):
# the counts below are compared exactly, which holds as long as no router probability of these
# 5 steps sits within rounding of a tie (it does not at this seed; a flip would move a token to
# another expert and fail the loss comparison by >> LOSS_RTOL, not pass silently).
MOE = BASE.replace(model="tiny-moe")  # top-2, capacity factor 1.25 (drops tokens)
DROPLESS_TOP1 = MOE.replace(top_k=1, capacity_factor=0.0)
# 4 blocks, routers in blocks 1 and 3 only: in 4 stages (interleaved, V) some ranks hold none
DEEP = BASE.replace(model="tiny-moe-deep")
CASES = {  # world size -> layouts run one after another in the same ranks (one launch per size)
    2: {"dp2": (MOE, dict(dp=2)), "ep2": (MOE, dict(dp=2, ep=2)),
        "ep2-top1-dropless-mb2": (DROPLESS_TOP1, dict(dp=2, ep=2, microbatches=2)),
        # pipeline: every stage backpropagates its own routers' aux losses (pipeline/stage.py)
        "pp2-1f1b": (MOE, dict(pp=2, microbatches=2)),
        "pp2-interleaved": (DEEP, dict(pp=2, microbatches=2, virtual_stages=2, schedule="interleaved")),
        "pp2-zb-v": (DEEP, dict(pp=2, microbatches=2, virtual_stages=2, schedule="zb-v"))},
    4: {"ep4": (MOE, dict(dp=4, ep=4)), "dp2-ep2": (MOE, dict(dp=4, ep=2)), "ep2-tp2": (MOE, dict(dp=2, ep=2, tp=2)),
        "dp2-ep2-pp2": (MOE, dict(dp=2, ep=2, pp=2, microbatches=2)),
        # ZeRO: the experts sharded over edp (the 2 ranks holding them), the rest over dp 4
        "dp4-ep2-zero1": (MOE, dict(dp=4, ep=2, zero=1)),
        "dp4-ep2-zero2-mb2": (MOE, dict(dp=4, ep=2, zero=2, microbatches=2)),
        "dp4-ep2-zero3-mb2": (MOE, dict(dp=4, ep=2, zero=3, microbatches=2)),  # each local expert a unit
        "dp2-ep2-pp2-zero1": (MOE, dict(dp=2, ep=2, pp=2, zero=1, microbatches=2))},
}
# Dropout: at dp > 1 every dp rank draws its own masks (parallel/rng.py), so a run with dropout
# matches the same dp without experts sharded, not the single process: layout -> its oracle's name
DROPOUT = MOE.replace(dropout=0.1)
DROPOUT_CASES = {2: {"dp2-dropout": (DROPOUT, dict(dp=2)), "ep2-dropout": (DROPOUT, dict(dp=2, ep=2))}}
DROPOUT_ORACLE = {"ep2-dropout": "dp2-dropout"}


def _train_layouts(cfgs: dict) -> dict:
    """Runs on every rank: each layout's 5 steps; the records' router statistics, the parameters
    gathered to full shape on rank 0, the ep group's counters of every step."""
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    out = {}
    for name, cfg in cfgs.items():
        s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
        records, ep_ops, dp_ops = [], [], []
        groups = [s.mesh.dp] + ([s.mesh.edp] if s.mesh.edp is not s.mesh.dp else [])
        for step in range(1, cfg.steps + 1):
            for g in [s.mesh.ep, *groups]:
                g.stats.reset()
            records.append(train_step(s, step))
            ep_ops.append({op: (st.calls, st.bytes, st.wire_bytes) for op, st in s.mesh.ep.stats.ops.items()})
            dp_ops.append([{op: st.wire_bytes for op, st in g.stats.ops.items()} for g in groups])
        out[name] = {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
                     "router": [r["router"] for r in records], "full_state": s.pm.full_state_dict(),
                     "ep_ops": ep_ops, "dp_ops": dp_ops, "pp_index": s.mesh.coords.pp,
                     "optimizer_elements": sum(st["exp_avg"].numel() for st in s.opt.state.values()),
                     "experts_held": sum(1 for n, _ in s.pm.module.named_parameters()
                                         if n.endswith("fc1.weight") and ".experts." in n)}
    return out


@functools.cache
def _run(world: int) -> tuple[dict, dict]:
    cases = {**CASES[world], **DROPOUT_CASES.get(world, {})}
    cfgs = {name: with_layout(base, **layout) for name, (base, layout) in cases.items()}
    return cfgs, run_ranks(world, _train_layouts, cfgs, timeout=300)


@functools.cache
def _reference(cfg):
    return reference_train(cfg.replace(layout=Layout()))


def _assert_router_matches(got: list[dict], ref: list[dict], who: str) -> None:
    for step, (g, r) in enumerate(zip(got, ref, strict=True), 1):
        assert g["tokens_per_expert"] == r["tokens_per_expert"] and g["dropped"] == r["dropped"], (who, step, g, r)
        # aux: a mean of per-sequence sums of products of probabilities: rounding only, like the loss
        assert abs(g["aux_loss"] - r["aux_loss"]) <= LOSS_RTOL * r["aux_loss"], (who, step, g, r)


@pytest.mark.equivalence
@pytest.mark.parametrize("world", sorted(CASES))
def test_expert_parallel_matches_reference(world):
    cfgs, results = _run(world)
    for name, cfg in cfgs.items():
        if name in DROPOUT_CASES.get(world, {}):
            continue
        res, ref = results[0][name], _reference(cfg)
        assert_matches_reference(res, ref, cfg, state="full_state", who=name)
        _assert_router_matches(res["router"], ref.router, name)
        assert sum(r["tokens_per_expert"][0] for r in ref.router) > 0 and any(r["dropped"] for r in ref.router) \
            == (cfg.model_config().capacity_factor > 0), name  # the capacity drops tokens, dropless none
        for rank, r in enumerate(results):  # every rank reports the same global loss, norm and routing
            assert r[name]["losses"] == res["losses"] and r[name]["grad_norms"] == res["grad_norms"], (name, rank)
            assert r[name]["router"] == res["router"], (name, rank)


@pytest.mark.equivalence
def test_expert_dropout_draws_the_tokens_masks():
    """--dropout 0.1 at ep 2: each expert's output dropout is drawn on the token's rank after the
    combine, in expert order (parallel/expert.py: dropout_rows), so the run has exactly the masks
    of dp 2 without ep, whose ranks run every expert themselves; it matches that run within the
    equivalence tolerances (the masks are the same bits, the rest is float reordering), while
    without dropout_rows the experts would drop nothing and the losses differ by ~1e-3."""
    cfgs, results = _run(2)
    for name, oracle in DROPOUT_ORACLE.items():
        res, want = results[0][name], results[0][oracle]
        ref = ReferenceRun(want["losses"], want["grad_norms"], want["full_state"], want["router"])
        assert_matches_reference(res, ref, cfgs[name], state="full_state", who=name)
        _assert_router_matches(res["router"], ref.router, name)
        assert res["losses"][-1] != _reference(cfgs[name].replace(dropout=0.0)).losses[-1], name  # it drops
        assert all(r[name]["losses"] == res["losses"] for r in results), name


@pytest.mark.parametrize("world", sorted(CASES))
def test_expert_parallel_traffic(world):
    """Each rank holds E / ep experts; every rank makes core/traffic.ep_comm_per_step's calls, and
    over all ranks the dispatch all-to-all carries exactly the kept assignments' rows (H fp32 each,
    once per tp rank), and so do the combine and the two backward exchanges; the wire bytes leave
    out each rank's rows for its own experts."""
    cfgs, results = _run(world)
    for name, cfg in cfgs.items():
        lay, model = cfg.layout, cfg.model_config()
        if lay.ep == 1:
            assert all(r[name]["ep_ops"] == [{}] * cfg.steps for r in results), name  # no exchange at ep 1
            continue
        if name in DROPOUT_CASES.get(world, {}):  # routed unlike the single process (dropout)
            continue
        if lay.zero:  # the AdamW state of every parameter exists once over all ranks (+ the tied copy)
            tied = lay.pp > 1 and model.tie_embeddings
            want = param_count(model) + (model.vocab_size * model.hidden if tied else 0)
            assert sum(r[name]["optimizer_elements"] for r in results) == want, name
        held = sum(r[name]["experts_held"] for r in results)  # every expert once per edp and tp index
        assert held == model.num_moe_blocks * model.num_experts * lay.world_size // (lay.ep * lay.pp), name
        assert all(r[name]["experts_held"] == held // len(results) for r in results), name
        ref = _reference(cfg).router
        for step in range(cfg.steps):
            kept = sum(ref[step]["tokens_per_expert"]) - ref[step]["dropped"]  # over the global batch
            if not model.capacity_factor:  # dropless: the formula's default, k x tokens per block, on each rank
                default = ep_comm_per_step(model, lay.ep, cfg.global_batch // lay.dp, cfg.seq_len)["ep_dispatch"]
                assert kept * model.hidden * 4 == lay.dp * default[1], (name, step, kept)
            # core/traffic.ep_comm_per_step, summed over ranks: every tp rank sends its copy of the rows
            want = ep_comm_per_step(model, lay.ep, cfg.global_batch // lay.dp, cfg.seq_len, lay.microbatches,
                                    kept=lay.tp * kept)
            for op, (calls, payload) in want.items():
                got = [r[name]["ep_ops"][step][op] for r in results if op in r[name]["ep_ops"][step]]
                if lay.pp > 1:  # each stage's ranks exchange for its own blocks: the calls add up over pp
                    assert sum(g[0] for g in got) == calls * lay.world_size // lay.pp, (name, step, op, got)
                    if op == "ep_counts":
                        assert sum(g[1] for g in got) == payload * lay.world_size // lay.pp, (name, step, got)
                        continue
                elif op == "ep_counts":  # per rank, not a sum of rows
                    assert all(g[:2] == (calls, payload) for g in got), (name, step, op, got, want[op])
                    continue
                else:
                    assert all(g[0] == calls for g in got), (name, step, op, got, calls)
                assert sum(g[1] for g in got) == payload, (name, step, op, got, payload)
                assert 0 < sum(g[2] for g in got) < payload, (name, step, op, got)  # wire: less its own rows


def _resume_both(cfgs: list, root: str) -> list[dict]:
    """On every rank: resume each of ``cfgs`` (same world size) from ``root`` in turn."""
    from tests.distributed.test_checkpoint_resume import _run

    return [_run(cfg, None, root)["losses"] for cfg in cfgs]


def test_checkpoint_resumes_and_reshards_out_of_ep(tmp_path):
    """An ep2 run saves after step 2 (each expert written once, by the rank holding it) and goes
    on; resumed in ep2 it continues bit for bit, resumed in dp2 (every rank reads all experts)
    within RESHARD_RTOL of the ep2 run (tests/distributed/test_checkpoint_resume.py)."""
    import json

    from tests.distributed.test_checkpoint_resume import CFG, RESHARD_RTOL, SAVE_AT, _run

    root = str(tmp_path / "checkpoints")
    cfg = CFG.replace(model="tiny-moe")
    saved = run_ranks(2, _run, with_layout(cfg, dp=2, ep=2), root, None)[0]["losses"]
    manifest = json.loads(next((tmp_path / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["layout"]["ep"] == 2
    experts = {k for k in manifest["tensors"] if ".experts." in k and not k.startswith("optim.")}
    assert len(experts) == 2 * 4 * 4, sorted(experts)  # 2 blocks x 4 experts x fc1/fc2 weight and bias
    same, other = run_ranks(2, _resume_both, [with_layout(cfg, dp=2, ep=2), with_layout(cfg, dp=2)], root)[0]
    assert same == {k: v for k, v in saved.items() if k > SAVE_AT}  # float equality: bit for bit
    assert sorted(other) == [3, 4]
    for step, loss in other.items():
        assert loss == pytest.approx(saved[step], rel=RESHARD_RTOL), step


def test_checkpoint_of_zero_with_ep_resumes_bit_exact(tmp_path):
    """dp4 x ep2 under ZeRO-3 saves after step 2: every rank writes its own pieces of the
    parameters and AdamW state (the experts' sharded over edp, the rest over dp; ZeRO-2 writes the
    same pieces of the state). Resumed in the same layout it continues bit for bit; resumed in
    plain dp4 (every rank reads whole tensors, experts included, from those pieces) within
    RESHARD_RTOL of the uninterrupted run."""
    from tests.distributed.test_checkpoint_resume import CFG, RESHARD_RTOL, SAVE_AT, _run

    root = str(tmp_path / "checkpoints")
    cfg = CFG.replace(model="tiny-moe")
    zero = with_layout(cfg, dp=4, ep=2, zero=3)
    saved = run_ranks(4, _run, zero, root, None)[0]["losses"]
    same, other = run_ranks(4, _resume_both, [zero, with_layout(cfg, dp=4)], root)[0]
    assert same == {k: v for k, v in saved.items() if k > SAVE_AT}  # float equality: bit for bit
    assert sorted(other) == [3, 4]
    for step, loss in other.items():
        assert loss == pytest.approx(saved[step], rel=RESHARD_RTOL), step


@pytest.mark.parametrize("world", sorted(CASES))
def test_expert_gradient_traffic_is_the_planners(world):
    """The gradient (and ZeRO's parameter) traffic of an ep layout, dp group plus edp group, per
    step and rank is the planner's dp bytes: the experts reduced over the dp / ep ranks holding
    them, the rest over dp. (Priced over all of dp, ep 2 of dp 4 would read the experts' share
    4/3 too high, and ep = dp would count bytes that are never sent.)"""
    from paratrain.plan.cost import stage_costs
    from paratrain.plan.hardware import get_hardware

    cfgs, results = _run(world)
    for name, cfg in cfgs.items():
        if cfg.layout.ep == 1 or name in DROPOUT_CASES.get(world, {}):
            continue
        stages = stage_costs(cfg.model_config(), cfg.layout, get_hardware("A100-80GB"), cfg.global_batch,
                             cfg.seq_len, precision="fp32")
        for rank, r in enumerate(results):
            want = stages[r[name]["pp_index"]].dp_bytes
            for step, groups in enumerate(r[name]["dp_ops"], 1):
                wire = sum(w for ops in groups for op, w in ops.items()
                           if op not in ("metrics", "checkpoint", "grad_norm"))  # the 4-byte scalars: not priced
                assert wire == pytest.approx(want, rel=1e-9), (name, rank, step, groups)
