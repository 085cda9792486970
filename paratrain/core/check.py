"""The checker: proves a schedule safe to run, without starting a process.

Rules (each violation raises :class:`~paratrain.core.schedules.ScheduleError`):

1. **Shape.** One action list per rank; micro-batch and chunk indices in range; a transfer's
   peer is the rank holding the neighbouring stage, and no transfer crosses the model's ends.
2. **Exactly once.** On every rank, each (micro-batch, chunk) is forwarded exactly once and
   backwarded exactly once -- by one ``B``, or by one ``I`` and one ``W`` (never, for a
   forward-only schedule); each tensor that must cross a stage boundary (between two ranks) is
   sent exactly once and received exactly once.
3. **Causality.** A backward (``B`` or ``I``) follows its forward, a ``W`` its ``I``; a send
   follows the compute that produces the tensor; a receive precedes the compute that consumes
   it; where two neighbouring stages are on one rank (the V placement's turn), the forward of
   the later one follows that of the earlier, and the backward order is the reverse.
4. **No deadlock, compatible order.** :func:`~.timeline.simulate` with ``blocking=True`` (every
   batch of transfers waits for all of them; transfers between two ranks matched in posting
   order) finishes, and every receive gets the tensor it expects. The runtime waits for less, so
   it cannot deadlock either.
5. **Memory.** The activations stashed on a rank (micro-batch chunks forwarded, whose ``B`` or
   ``W`` has not run: a ``W`` needs what its ``I`` kept) never exceed the schedule's
   ``in_flight_bound`` (1F1B: ``min(p - r, m) <= p``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from paratrain.core.schedules import (
    RECV_ACT,
    RECV_GRAD,
    SEND_ACT,
    SEND_GRAD,
    Action,
    B,
    F,
    I,
    Schedule,
    ScheduleError,
    W,
)
from paratrain.core.timeline import simulate


@dataclass(frozen=True)
class CheckReport:
    peak_in_flight: tuple[int, ...]  # per rank, in micro-batch chunks


def in_flight(actions: tuple[Action, ...]) -> int:
    """Peak number of (micro-batch, chunk) activations stashed at once by one rank's actions
    (from the forward to the ``B`` or ``W`` that frees them)."""
    live = peak = 0
    for a in actions:
        if a.kind == F:
            live += 1
            peak = max(peak, live)
        elif a.kind in (B, W):
            live -= 1
    return peak


def _peer_of(s: Schedule, rank: int, a: Action) -> int | None:
    """The rank a transfer must talk to, or None if the transfer crosses the model's ends."""
    stage = s.stage(rank, a.chunk)
    other = stage + (1 if a.kind in (SEND_ACT, RECV_GRAD) else -1)
    return s.place(other)[0] if 0 <= other < s.num_stages else None


def _local(s: Schedule, rank: int, a: Action) -> bool:
    """Whether the transfer ``a`` names stays on this rank (the V placement's turn): no action."""
    return _peer_of(s, rank, a) == rank


def _check_shape(s: Schedule) -> None:
    if len(s.ranks) != s.num_ranks or len(s.in_flight_bound) != s.num_ranks:
        raise ScheduleError(f"{s.name}: {len(s.ranks)} action lists and {len(s.in_flight_bound)} "
                            f"memory bounds for {s.num_ranks} ranks")
    for r, acts in enumerate(s.ranks):
        for a in acts:
            if not (0 <= a.microbatch < s.num_microbatches and 0 <= a.chunk < s.num_chunks):
                raise ScheduleError(f"rank {r}: {a} is outside {s.num_microbatches} micro-batches x "
                                    f"{s.num_chunks} chunks")
            if a.is_compute:
                if a.peer is not None:
                    raise ScheduleError(f"rank {r}: compute action {a} names a peer")
                continue
            want = _peer_of(s, r, a)
            if want == r:
                raise ScheduleError(f"rank {r}: {a} sends to itself; neighbouring stages on one rank "
                                    f"hand their tensors over without a transfer")
            if want is None:
                raise ScheduleError(f"rank {r}: {a} crosses the end of the model (stage "
                                    f"{s.stage(r, a.chunk)} of {s.num_stages})")
            if a.peer != want:
                raise ScheduleError(f"rank {r}: {a} talks to rank {a.peer}, but the neighbouring "
                                    f"stage is on rank {want}")


def _required(s: Schedule, rank: int, split: set[tuple[int, int]]) -> Counter[Action]:
    """Every action rank ``rank`` must perform exactly once; ``split``: the (micro-batch, chunk)
    whose backward is an I and a W instead of a B."""
    need: Counter[Action] = Counter()
    kinds = ((F, RECV_ACT, SEND_ACT), (B, RECV_GRAD, SEND_GRAD)) if s.has_backward else ((F, RECV_ACT, SEND_ACT),)
    for c in range(s.num_chunks):
        for mb in range(s.num_microbatches):
            for compute, recv, send in kinds:
                if compute == B and (mb, c) in split:
                    need[Action(I, mb, c)] += 1
                    need[Action(W, mb, c)] += 1
                else:
                    need[Action(compute, mb, c)] += 1
                for kind in (recv, send):
                    peer = _peer_of(s, rank, Action(kind, mb, c))
                    if peer is not None and peer != rank:
                        need[Action(kind, mb, c, peer)] += 1
    return need


def _local_before(s: Schedule, r: int, a: Action) -> Action | None:
    """The compute of the neighbouring stage on this same rank that ``a`` consumes, if any."""
    if a.kind not in (F, B, I):
        return None
    recv = RECV_ACT if a.kind == F else RECV_GRAD
    if not _local(s, r, Action(recv, a.microbatch, a.chunk)):
        return None
    stage = s.stage(r, a.chunk) + (-1 if a.kind == F else 1)
    return Action(a.kind, a.microbatch, s.place(stage)[1])


def _check_once_and_causal(s: Schedule) -> None:
    for r, acts in enumerate(s.ranks):
        split = {(a.microbatch, a.chunk) for a in acts if a.kind == I}
        have, need = Counter(acts), _required(s, r, split)
        if have != need:
            extra = sorted(map(str, (have - need).elements()))
            missing = sorted(map(str, (need - have).elements()))
            raise ScheduleError(f"rank {r}: actions not performed exactly once; extra {extra[:6]}, "
                                f"missing {missing[:6]}")
        pos = {a: i for i, a in enumerate(acts)}
        for a, i in pos.items():
            before = []
            grad = I if (a.microbatch, a.chunk) in split else B  # what computes this input gradient
            if a.kind in (B, I):
                before.append(Action(F, a.microbatch, a.chunk))
            if a.kind == W:
                before.append(Action(I, a.microbatch, a.chunk))
            if a.kind in (SEND_ACT, SEND_GRAD):
                before.append(Action(F if a.kind == SEND_ACT else grad, a.microbatch, a.chunk))
            if a.kind in (F, B, I):
                recv = RECV_ACT if a.kind == F else RECV_GRAD
                peer = _peer_of(s, r, Action(recv, a.microbatch, a.chunk))
                if peer is not None and peer != r:
                    before.append(Action(recv, a.microbatch, a.chunk, peer))
            local = _local_before(s, r, a)
            if local is not None:
                if local.kind != F and (local.microbatch, local.chunk) in split:
                    local = Action(I, local.microbatch, local.chunk)
                elif local.kind != F:
                    local = Action(B, local.microbatch, local.chunk)
                before.append(local)
            for b in before:
                if pos[b] > i:
                    raise ScheduleError(f"rank {r}: {a} (action {i}) comes before {b} (action {pos[b]}), "
                                        f"which it depends on")


def check(s: Schedule) -> CheckReport:
    """Raise ScheduleError unless ``s`` obeys every rule of this module; report its peak memory."""
    _check_shape(s)
    _check_once_and_causal(s)
    simulate(s, blocking=True)
    # without backward nothing is kept for later: each activation is dropped once sent
    peaks = tuple(in_flight(acts) if s.has_backward else 0 for acts in s.ranks)
    for r, (peak, bound) in enumerate(zip(peaks, s.in_flight_bound)):
        if peak > bound:
            raise ScheduleError(f"rank {r} stashes {peak} micro-batch activations at once; the "
                                f"{s.name} schedule promises at most {bound}")
    return CheckReport(peaks)
