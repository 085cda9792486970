"""Pipeline parallelism reproduces the single-process reference; a failing stage ends the job."""

from __future__ import annotations

import functools
import re
import time

import pytest
import torch

from paratrain.core.traffic import p2p_sends_per_microbatch, pp_send_bytes_per_step
from paratrain.reference import reference_train
from tests.common import BASE, max_param_diff, train_ranks_fn, with_layout
from tests.harness import RankFailure, run_ranks

# fp32 on CPU. A pipeline computes the same operations as the reference on slices of the batch:
# each micro-batch's loss is the mean over its B/m sequences and backward scales it by 1/m, so
# gradients are sums of per-slice matmuls (rounding differs at ~1e-7 relative) -- the same
# situation as gradient accumulation in the data-parallel tests, with the same tolerances and
# the same reasons: losses and pre-clip gradient norms agree to ~2e-7 (measured), parameters to
# ~4e-6 where AdamW amplifies rounding noise of mathematically-zero gradients (attention key
# bias). A wrong loss scale (e.g. forgetting 1/m) moves the pre-clip norm by a factor m; a
# missing tied-gradient sum moves it by tens of percent and the embedding by ~lr.
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5
PARAM_ATOL = 1e-5

DEEP = BASE.replace(model="tiny-deep")  # 8 blocks: room for pp 4 x 2 virtual stages
UNTIED = BASE.replace(untie_embeddings=True)
ODD = BASE.replace(model="tiny-odd")  # vocabulary 257: padded to 384 rows at tp 2

CASES = {
    "pp2-gpipe": (BASE, dict(pp=2, microbatches=4, schedule="gpipe")),
    "pp2-1f1b": (BASE, dict(pp=2, microbatches=4, schedule="1f1b")),
    "pp2-interleaved-v2": (BASE, dict(pp=2, microbatches=4, schedule="interleaved", virtual_stages=2)),
    "pp4-gpipe": (BASE, dict(pp=4, microbatches=4, schedule="gpipe")),
    "pp4-1f1b": (BASE, dict(pp=4, microbatches=8, schedule="1f1b")),
    "pp4-interleaved-v2": (DEEP, dict(pp=4, microbatches=4, schedule="interleaved", virtual_stages=2)),
    "dp2-pp2-1f1b": (BASE, dict(dp=2, pp=2, microbatches=2, schedule="1f1b")),
    "pp2-untied-by-hand": (UNTIED, dict(pp=2, microbatches=2, schedule="1f1b", stage_layers=(1, 3))),
    # with tensor parallelism: each stage's layers are tp-sharded (vocab-parallel embedding and
    # loss; the tied embedding is summed per tp shard); SP sends (B/m, T/tp, H) between stages
    "pp2-tp2-sp-interleaved": (BASE, dict(pp=2, tp=2, sequence_parallel=True, microbatches=2,
                                         schedule="interleaved", virtual_stages=2)),
    "dp2-pp2-tp2": (BASE, dict(dp=2, pp=2, tp=2, microbatches=2, schedule="1f1b")),
    # padded vocabulary: the tied embedding's padded shards summed between the first and last
    # stage; the state gathered per stage without the padding rows
    "pp2-tp2-padded-vocab": (ODD, dict(pp=2, tp=2, microbatches=2, schedule="1f1b")),
}
# Tensor parallelism rounds differently in the loss's vocabulary sum and in the row-parallel
# matmuls; tests/distributed/test_tensor_parallel.py explains and measures its parameter tolerance.
TP_PARAM_ATOL = 1e-4


@functools.cache
def reference(cfg):
    return reference_train(cfg)


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_reference(name):
    base, layout = CASES[name]
    cfg = with_layout(base, **layout)
    results = run_ranks(cfg.layout.world_size, train_ranks_fn, cfg)
    ref = reference(base)
    assert max(ref.grad_norms) > base.grad_clip  # clipping was active
    for rank, res in enumerate(results):  # every rank reports the last stage's loss
        assert res["losses"] == pytest.approx(ref.losses, rel=LOSS_RTOL), f"rank {rank} losses"
        assert res["grad_norms"] == pytest.approx(ref.grad_norms, rel=NORM_RTOL), f"rank {rank} norms"
    atol = TP_PARAM_ATOL if cfg.layout.tp > 1 else PARAM_ATOL
    diff, where = max_param_diff(results[0]["full_state"], ref.state)  # gathered, reference-shaped
    assert diff <= atol, f"max |param - reference| = {diff:.3g} at {where}"
    # each stage holds only its layers, under the reference's names, with the reference's values
    p, v = cfg.layout.pp, cfg.layout.virtual_stages
    seen: set[str] = set()
    for rank, res in enumerate(results):
        seen |= set(res["state"])
        if cfg.layout.tp == 1:  # (tp-sharded tensors are compared gathered, above)
            for k, t in res["state"].items():
                assert torch.allclose(t, ref.state[k], rtol=0, atol=atol), f"rank {rank}: {k}"
        # count what moves: activations forward and gradients back, once per stage boundary
        # (the formula the planner uses too)
        pipe = rank // (cfg.layout.dp * cfg.layout.tp)  # rank = (pp_i * dp + dp_i) * tp + tp_i
        expected = pp_send_bytes_per_step(cfg.model_config(), p, v, pipe, cfg.global_batch // cfg.layout.dp,
                                          cfg.seq_len, cfg.layout.tp, cfg.layout.sequence_parallel)
        boundaries = sum((s < p * v - 1) + (s > 0) for s in (k * p + pipe for k in range(v)))
        assert p2p_sends_per_microbatch(p, v)[pipe] == boundaries  # one (B/m, T, H) tensor per boundary
        sent = res["ops"]["pp"]["send"]["bytes"]
        assert sent == cfg.steps * expected, f"rank {rank}"
    assert seen == set(ref.state)
    # the measured timeline of the last step
    tl = results[0]["timeline"]
    assert len(tl["ranks"]) == p
    assert 0 <= tl["bubble"] < 1
    for spans in tl["ranks"]:
        computes = [a for a in spans if a["kind"] in ("F", "B")]
        assert len(computes) == 2 * cfg.layout.microbatches * v
        assert all(a["start"] <= a["end"] <= b["start"] for a, b in zip(computes, computes[1:]))


def _fail_inside_schedule(cfg, bad_rank: int, mode: str) -> None:
    """Rank ``bad_rank`` raises (or stalls far beyond the timeout) in its third forward of step
    2, mid-schedule. Every rank's error says how long into step 2 it came."""
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    train_step(s, 1)
    if s.mesh.rank == bad_rank:
        chunk, calls = s.pm.runtime.chunks[0], [0]

        def failing(x, targets):
            calls[0] += 1
            if calls[0] == 3:
                if mode == "hang":
                    time.sleep(600)
                raise RuntimeError("injected failure inside the schedule")
            return chunk(x, targets)

        s.pm.runtime.chunks = [failing]
    t0 = time.monotonic()
    try:
        train_step(s, 2)
    except Exception as e:
        raise RuntimeError(f"failed {time.monotonic() - t0:.1f} s into step 2") from e


def _failure_seconds(section: str) -> float:
    return float(re.search(r"RuntimeError: failed ([0-9.]+) s into step 2", section).group(1))


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_stage_does_not_hang_the_others(mode):
    # Each survivor must fail on its own -- its peer's connection closes, or its process-group
    # timeout (5 s) expires while the bad stage stalls -- well before the harness would kill it.
    cfg = with_layout(BASE.replace(timeout_s=5.0), pp=4, microbatches=8, schedule="1f1b")
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as e:
        run_ranks(4, _fail_inside_schedule, cfg, 2, mode, timeout=90, pg_timeout=5, grace=10)
    text = str(e.value)
    sections = {r: text.split(f"--- rank {r} ---")[1].split("--- rank")[0] for r in range(4)
                if f"--- rank {r} ---" in text}
    survivors = [0, 1, 3]
    for rank in survivors:
        assert "Traceback" in sections.get(rank, ""), f"rank {rank} did not fail by itself:\n{text}"
        assert _failure_seconds(sections[rank]) < 3 * cfg.timeout_s, sections[rank]
    if mode == "raise":
        assert "injected failure inside the schedule" in sections[2]
    assert time.monotonic() - t0 < 45
