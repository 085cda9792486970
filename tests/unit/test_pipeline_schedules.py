"""Pipeline schedules are data: generated, checked and simulated without a process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paratrain.core.bubble import bubble_fraction, in_flight_microbatches
from paratrain.core.check import check, in_flight
from paratrain.core.schedules import (
    RECV_ACT,
    RECV_GRAD,
    SEND_ACT,
    SEND_GRAD,
    Action,
    B,
    F,
    Schedule,
    ScheduleError,
    build_schedule,
)
from paratrain.core.timeline import simulate

# Unit costs per stage (forward 1; backward 1, or 2 as on real hardware). A chunk of an
# interleaved schedule costs 1/v of a stage. Floats add exactly here (powers of two), but the
# simulated bubble is compared with the formula with a 1e-9 tolerance anyway.
COSTS = ({"F": 1.0, "B": 1.0}, {"F": 1.0, "B": 2.0})


def stage_costs(cost: dict[str, float], v: int) -> dict[str, float]:
    return {k: x / v for k, x in cost.items()}


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 16), name=st.sampled_from(["gpipe", "1f1b"]))
def test_gpipe_and_1f1b_are_safe_and_have_the_textbook_bubble(p, m, name):
    s = build_schedule(name, p, m)
    report = check(s)
    for cost in COSTS:
        for blocking in (True, False):  # checker's strict semantics and the runtime's
            bubble = simulate(s, cost, blocking=blocking).bubble
            assert bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-9)
    if name == "1f1b":
        assert max(report.peak_in_flight) <= p  # the point of 1F1B
        assert report.peak_in_flight == tuple(min(p - r, m) for r in range(p))
    else:
        assert report.peak_in_flight == (m,) * p


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 6), groups=st.integers(1, 4), v=st.integers(1, 4))
def test_interleaved_is_safe_and_shrinks_the_bubble_by_v(p, groups, v):
    m = groups * p
    s = build_schedule("interleaved", p, m, v)
    check(s)
    for cost in COSTS:
        bubble = simulate(s, stage_costs(cost, v)).bubble
        assert bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9)
    assert bubble == pytest.approx(bubble_fraction("interleaved", p, m, v))  # the planner's formula


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 6), m=st.integers(1, 8), v=st.integers(1, 3))
def test_forward_only_schedule_is_safe(p, m, v):
    s = build_schedule("forward", p, m, v)
    assert check(s).peak_in_flight == (0,) * p
    assert not any(a.kind == B for acts in s.ranks for a in acts)


def test_1f1b_action_lists_read_like_the_paper():
    s = build_schedule("1f1b", 2, 4)
    assert [str(a) for a in s.compute_order(0)] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert [str(a) for a in s.compute_order(1)] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    # stage 0 sends activation 1 and receives gradient 0 in one batch, between F1 and B0
    assert [str(a) for a in s.ranks[0][2:6]] == ["F1", "send_act1@1", "recv_grad0@1", "B0"]


def test_interleaved_wraps_around_between_chunks():
    s = build_schedule("interleaved", 2, 2, 2)
    # stage 1 (rank 1, chunk 0) feeds stage 2 (rank 0, chunk 1)
    assert Action(SEND_ACT, 0, 0, 0) in s.ranks[1]
    assert Action(RECV_ACT, 0, 1, 1) in s.ranks[0]


def _manual(ranks: list[list[Action]], m: int = 2, bound: int = 2) -> Schedule:
    return Schedule("manual", len(ranks), m, 1, tuple(tuple(r) for r in ranks), (bound,) * len(ranks))


def test_checker_rejects_a_deadlocking_schedule():
    # Rank 0 holds back micro-batch 1's activation until it has micro-batch 0's gradient, but rank
    # 1 runs both forwards before its first backward: each waits for the other forever.
    rank0 = [Action(F, 0), Action(SEND_ACT, 0, 0, 1), Action(F, 1), Action(RECV_GRAD, 0, 0, 1),
             Action(B, 0), Action(SEND_ACT, 1, 0, 1), Action(RECV_GRAD, 1, 0, 1), Action(B, 1)]
    rank1 = [Action(RECV_ACT, 0, 0, 0), Action(F, 0), Action(RECV_ACT, 1, 0, 0), Action(F, 1),
             Action(B, 0), Action(SEND_GRAD, 0, 0, 0), Action(B, 1), Action(SEND_GRAD, 1, 0, 0)]
    with pytest.raises(ScheduleError, match="deadlock"):
        check(_manual([rank0, rank1]))
    # rank 0 sending micro-batch 1's activation right after computing it breaks the cycle
    rank0[3:6] = [Action(SEND_ACT, 1, 0, 1), Action(RECV_GRAD, 0, 0, 1), Action(B, 0)]
    rank0[1:3] = [Action(SEND_ACT, 0, 0, 1), Action(F, 1)]
    check(_manual([rank0, rank1]))


def test_checker_rejects_receives_out_of_sending_order():
    s = build_schedule("gpipe", 2, 2)
    rank1 = list(s.ranks[1])
    i, j = rank1.index(Action(RECV_ACT, 0, 0, 0)), rank1.index(Action(RECV_ACT, 1, 0, 0))
    rank1[i], rank1[j] = rank1[j], rank1[i]
    i, j = rank1.index(Action(F, 0)), rank1.index(Action(F, 1))
    rank1[i], rank1[j] = rank1[j], rank1[i]  # causal, but rank 0 sends micro-batch 0 first
    with pytest.raises(ScheduleError, match="mismatch"):
        check(dataclasses.replace(s, ranks=(s.ranks[0], tuple(rank1))))


def _edited(s: Schedule, rank: int, edit) -> Schedule:
    acts = list(s.ranks[rank])
    edit(acts)
    ranks = list(s.ranks)
    ranks[rank] = tuple(acts)
    return dataclasses.replace(s, ranks=tuple(ranks))


@pytest.mark.parametrize("case, message", [
    ("drop backward", "exactly once"),
    ("repeat forward", "exactly once"),
    ("backward first", "before"),
    ("wrong peer", "neighbouring stage"),
    ("past the end", "crosses the end"),
    ("too much memory", "promises at most"),
])
def test_checker_rejects_broken_schedules(case, message):
    s = build_schedule("1f1b", 3, 4)
    if case == "drop backward":
        s = _edited(s, 1, lambda a: a.remove(Action(B, 2)))
    elif case == "repeat forward":
        s = _edited(s, 0, lambda a: a.append(Action(F, 0)))
    elif case == "backward first":
        def swap(a):
            i, j = a.index(Action(F, 3)), a.index(Action(B, 3))
            a[i], a[j] = a[j], a[i]
        s = _edited(s, 2, swap)
    elif case == "wrong peer":
        s = _edited(s, 1, lambda a: a.__setitem__(a.index(Action(SEND_ACT, 0, 0, 2)), Action(SEND_ACT, 0, 0, 0)))
    elif case == "past the end":
        s = _edited(s, 2, lambda a: a.append(Action(SEND_ACT, 0, 0, 0)))
    else:
        s = dataclasses.replace(s, in_flight_bound=(2, 2, 1))  # rank 0 of 1F1B stashes 3
    with pytest.raises(ScheduleError, match=message):
        check(s)


def test_in_flight_counts_stashed_activations():
    assert in_flight((Action(F, 0), Action(F, 1), Action(B, 0), Action(F, 2), Action(B, 1))) == 2


def test_simulation_with_a_slow_stage_and_transfer_costs():
    s = build_schedule("1f1b", 2, 8)

    def cost(rank: int, a: Action) -> float:
        if a.is_compute:
            return (2.0 if rank == 1 else 1.0) * (1 if a.kind == F else 2)
        return 0.25 if a.kind in (SEND_ACT, SEND_GRAD) else 0.0

    t = simulate(s, cost)
    assert t.bubble > bubble_fraction("1f1b", 2, 8)  # imbalance and transfers add idle time
    assert t.idle_fractions()[0] > t.idle_fractions()[1]  # the fast stage waits for the slow one
    for spans in t.ranks:
        computes = [x for x in spans if x.action.is_compute]
        assert all(a.end <= b.start + 1e-12 for a, b in zip(computes, computes[1:]))
    data = t.to_json()
    assert data["bubble"] == pytest.approx(t.bubble) and len(data["ranks"]) == 2


def test_schedule_cli_draws_without_torch(tmp_path):
    code = ("import sys; from paratrain.cli import main; "
            "rc = main(['schedule', '--pp', '4', '--microbatches', '8', '--schedule', 'interleaved', "
            f"'--virtual-stages', '2', '--out', r'{tmp_path / 't.png'}']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "bubble fraction: 0.1579 simulated" in r.stdout  # (p-1)/(v m+p-1) = 3/19
    assert "rank 0: 11" in r.stdout  # peak in-flight chunks: 2(p-1) + (v-1)p + 1
    assert (tmp_path / "t.png").stat().st_size > 5000


@pytest.mark.parametrize("args, message", [
    (["--pp", "4", "--microbatches", "6", "--schedule", "interleaved", "--virtual-stages", "2"],
     "multiple of pp=4"),
    (["--pp", "2", "--virtual-stages", "2", "--schedule", "1f1b"], "needs schedule 'interleaved'"),
    (["--pp", "0"], "pp must be a positive integer"),
    (["--pp", "1", "--schedule", "interleaved", "--virtual-stages", "2"], "use --pp 2 or more"),
])
def test_schedule_cli_rejects_bad_input(args, message, capsys):
    from paratrain.cli import main

    assert main(["schedule", *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("name, p, m, v", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1),
                                           ("interleaved", 4, 8, 2), ("interleaved", 2, 2, 3)])
def test_memory_bound_is_the_planners(name, p, m, v):
    # the planner's memory model counts in-flight micro-batches in units of the device's layers
    s = build_schedule(name, p, m, v)
    assert list(s.in_flight_bound) == [pytest.approx(in_flight_microbatches(name, p, m, v, r) * v)
                                       for r in range(p)]
