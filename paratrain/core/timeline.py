"""Timelines of a schedule: when each action of each rank starts and ends.

:func:`simulate` computes one from per-action durations, with the runtime's semantics or the
checker's stricter blocking ones (see :mod:`.schedules`), and so also detects deadlocks and
mismatched transfers; the runtime builds the same :class:`Timeline` from measured times
(:func:`from_times`). The planner can reuse :func:`simulate` with its cost model as durations.

Bubble of a timeline: with ``T`` the span from the first forward's start to the last
backward's end over all ranks (the pipeline's time, as in the bubble formula) and ``busy_r`` the
time rank ``r`` spends in forward/backward computation,
``bubble = mean_r (1 - busy_r / T)`` -- the idle fraction of the step (waiting on transfers
counts as idle). Under uniform costs it equals :func:`paratrain.core.bubble.bubble_fraction`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from paratrain.core.schedules import (
    RECV_ACT,
    RECV_GRAD,
    RECVS,
    SEND_ACT,
    Action,
    Schedule,
    ScheduleError,
)

Durations = Callable[[int, Action], float] | Mapping[str, float]
UNIT = {"F": 1.0, "B": 1.0, "I": 1.0, "W": 1.0}  # kinds not listed take 0, like every transfer


@dataclass(frozen=True, slots=True)
class Span:
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """``ranks[r]``: the spans of rank ``r`` in program order."""

    schedule: Schedule
    ranks: tuple[tuple[Span, ...], ...]

    def _computes(self) -> list[Span]:
        return [s for spans in self.ranks for s in spans if s.action.is_compute]

    @property
    def start(self) -> float:
        """When the first forward starts (a receive posted earlier is not part of the step)."""
        return min(s.start for s in self._computes())

    @property
    def makespan(self) -> float:
        """From the first forward's start to the last compute's end, over all ranks."""
        return max(s.end for s in self._computes()) - self.start

    def busy(self, rank: int) -> float:
        return sum(s.end - s.start for s in self.ranks[rank] if s.action.is_compute)

    def idle_fractions(self) -> list[float]:
        total = self.makespan
        return [1.0 - self.busy(r) / total if total > 0 else 0.0 for r in range(len(self.ranks))]

    @property
    def bubble(self) -> float:
        idle = self.idle_fractions()
        return sum(idle) / len(idle)

    def to_json(self) -> dict[str, Any]:
        """Plain data (times relative to the timeline's start) for ``timeline.json``."""
        t0, s = self.start, self.schedule
        return {
            "schedule": s.name, "pp": s.num_ranks, "microbatches": s.num_microbatches,
            "virtual_stages": s.num_chunks, "makespan": self.makespan, "bubble": self.bubble,
            "idle_fraction_per_rank": self.idle_fractions(),
            "ranks": [[{"kind": x.action.kind, "microbatch": x.action.microbatch, "chunk": x.action.chunk,
                        "peer": x.action.peer, "start": x.start - t0, "end": x.end - t0} for x in spans]
                      for spans in self.ranks],
        }


def from_times(schedule: Schedule, times: list[list[tuple[float, float]]]) -> Timeline:
    """A timeline from measured ``(start, end)`` pairs, one per action of each rank."""
    ranks = []
    for r, pairs in enumerate(times):
        acts = schedule.ranks[r]
        assert len(pairs) == len(acts), f"rank {r}: {len(pairs)} times for {len(acts)} actions"
        ranks.append(tuple(Span(a, float(t0), float(t1)) for a, (t0, t1) in zip(acts, pairs)))
    return Timeline(schedule, tuple(ranks))


def _batches(actions: tuple[Action, ...]) -> list[list[int]]:
    """Indices grouped into steps: a compute action alone, or a maximal run of transfers."""
    steps: list[list[int]] = []
    for i, a in enumerate(actions):
        if a.is_compute or not steps or actions[steps[-1][-1]].is_compute:
            steps.append([i])
        else:
            steps[-1].append(i)
    return steps


def _consumer_recv(schedule: Schedule, rank: int) -> dict[int, int]:
    """Index of each compute action -> index of the receive that feeds it (same rank)."""
    where: dict[tuple[str, int, int], int] = {}
    feeds: dict[int, int] = {}
    for i, a in enumerate(schedule.ranks[rank]):
        if a.kind in RECVS:
            where[(a.kind, a.microbatch, a.chunk)] = i
        elif a.kind in ("F", "B", "I"):  # a W consumes nothing that travels
            key = (RECV_ACT if a.kind == "F" else RECV_GRAD, a.microbatch, a.chunk)
            if key in where:
                feeds[i] = where[key]
    return feeds


def simulate(schedule: Schedule, durations: Durations = UNIT, blocking: bool = False) -> Timeline:
    """Run the schedule on a model clock and return its timeline.

    ``durations`` maps an action kind to its duration, or is ``f(rank, action) -> seconds``; a
    transfer takes its send's duration, counted from the moment both sides have posted.

    ``blocking=True``: the strict semantics of :mod:`.schedules` (a batch of transfers waits for
    all of them) -- what :mod:`.check` proves deadlock-free. ``blocking=False``: what the runtime
    does, which can only finish earlier: transfers are posted without waiting, a compute waits
    for the receive that feeds it, sends are waited for at the end of the step.

    Raises ScheduleError on a deadlock, or when a receive would get another tensor than the one
    it expects (transfers between two ranks are matched in posting order)."""
    if isinstance(durations, Mapping):
        table = dict(durations)

        def duration(rank: int, a: Action) -> float:
            return table.get(a.kind, 0.0)
    else:
        duration = durations
    p = schedule.num_ranks
    acts = schedule.ranks
    steps = [_batches(a) if blocking else [[i] for i in range(len(a))] for a in acts]
    feeds = [_consumer_recv(schedule, r) for r in range(p)]
    pc, clock, posted = [0] * p, [0.0] * p, [False] * p
    done: dict[tuple[int, int], float] = {}  # (rank, action index) -> completion time
    start: dict[tuple[int, int], float] = {}
    waiting: dict[tuple[str, int, int], deque[tuple[int, int, float]]] = defaultdict(deque)

    def post(r: int, i: int, t: float) -> None:
        start[(r, i)] = t
        a = acts[r][i]
        is_recv = a.kind in RECVS
        src, dst = (a.peer, r) if is_recv else (r, a.peer)
        mine, theirs = ("recv", "send") if is_recv else ("send", "recv")
        other = waiting[(theirs, src, dst)]
        if not other:
            waiting[(mine, src, dst)].append((r, i, t))
            return
        r2, i2, t2 = other.popleft()
        (sr, si, st), (rr, ri, rt) = ((r2, i2, t2), (r, i, t)) if is_recv else ((r, i, t), (r2, i2, t2))
        send, recv = acts[sr][si], acts[rr][ri]
        if not _compatible(schedule, sr, send, rr, recv):
            raise ScheduleError(f"transfer mismatch on channel rank {sr} -> rank {rr}: rank {sr} sends "
                                f"{send} (its action {si}) but rank {rr} posts {recv} (its action {ri}) "
                                f"to receive it; receives must follow the sender's order")
        done[(sr, si)] = done[(rr, ri)] = max(st, rt) + duration(sr, send)

    def advance(r: int) -> bool:
        """Try the next step of rank ``r``; False when it must wait."""
        step = steps[r][pc[r]]
        first = acts[r][step[0]]
        if first.is_compute:
            feed = feeds[r].get(step[0])
            if feed is not None and not blocking:
                if (r, feed) not in done:
                    return False
                clock[r] = max(clock[r], done[(r, feed)])
            start[(r, step[0])] = clock[r]
            clock[r] += duration(r, first)
            done[(r, step[0])] = clock[r]
        elif not posted[r]:
            for i in step:
                post(r, i, clock[r])
            if blocking:
                posted[r] = True
                return True
        elif all((r, i) in done for i in step):
            clock[r] = max([clock[r]] + [done[(r, i)] for i in step])
            posted[r] = False
        else:
            return False
        pc[r] += 1
        return True

    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pc[r] < len(steps[r]) and advance(r):
                progress = True
    stuck = [r for r in range(p) if pc[r] < len(steps[r])]
    unmatched = [(r, i) for r in range(p) for i in range(len(acts[r])) if (r, i) not in done]
    if stuck or unmatched:
        detail = "; ".join(f"rank {r} waits at {acts[r][steps[r][pc[r]][0]]}" for r in stuck)
        lost = ", ".join(f"rank {r}: {acts[r][i]}" for r, i in unmatched if r not in stuck)
        raise ScheduleError(f"deadlock in schedule {schedule.name!r}: {detail or 'every rank finished'}"
                            + (f"; never matched: {lost}" if lost else ""))
    return Timeline(schedule, tuple(tuple(Span(a, start[(r, i)], done[(r, i)]) for i, a in enumerate(acts[r]))
                                    for r in range(p)))


def _compatible(schedule: Schedule, src: int, send: Action, dst: int, recv: Action) -> bool:
    """A send and a receive carry the same tensor: same micro-batch, matching kinds, and the
    receiving chunk is the next stage (activations) or the previous one (gradients)."""
    if send.kind == SEND_ACT:
        want, step = RECV_ACT, 1
    else:
        want, step = RECV_GRAD, -1
    return (recv.kind == want and recv.microbatch == send.microbatch
            and schedule.stage(dst, recv.chunk) == schedule.stage(src, send.chunk) + step)
