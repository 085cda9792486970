"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): the
backward of a chunk is split into ``I`` (the gradient of the chunk's input, which the previous
stage waits for) and ``W`` (the weight gradients, which nothing downstream waits for), and the
``W`` s are placed in what would be the bubbles. Pure Python, like :mod:`.schedules`.

ZB-V with at least ``2p - 1`` micro-batches is the paper's hand-made V order
(:func:`v_pattern`); with fewer, a list scheduler on unit ticks (every compute takes one tick,
transfers are free) builds it: at each tick every rank runs the first ready action in the order

    I (oldest micro-batch first)  >  F (if the memory bound allows)  >  W (oldest first)

An ``I`` is on the critical path (the previous stage waits for it), an ``F`` feeds the next
stage, a ``W`` only frees memory. Memory: a micro-batch chunk is *stashed* from its ``F`` to its
``W`` (``W`` needs the inputs and output gradients its ``I`` left), and ``F`` waits while the
rank stashes ``bound`` chunks.

* **ZB-H1** (one chunk per rank) is hand-made instead (:func:`zb_h1`, the paper's section 2.1):
  under ``F = I = W`` and ``m >= p`` every rank idles ``p - 1`` ticks in ``3m + p - 1``: a bubble
  of ``(p-1)/(3m+p-1)`` of the step, the paper's ``(p - 1)(T_F + T_B - T_W)`` bubble time (a third
  of 1F1B's ``(p - 1)(T_F + T_B + T_W)``; the paper's ``B`` is our ``I``).
* **ZB-V** (two chunks per rank in the V placement of :func:`.schedules.stage_of`): ``bound =
  min(2p, 2m)`` chunks = ``p`` micro-batches of the rank's layers, 1F1B's peak. Every rank
  idles only the ``p - 1`` ticks (of a chunk) that the first micro-batch needs to reach the last
  rank: ``(p-1)/(6m+p-1)``. The paper calls it zero: its optimizer post-validation lets the next
  step start inside that slant, which a synchronous optimizer step (ours) does not.

The tests simulate both and check these fractions and bounds for many ``p`` and ``m``.
"""

from __future__ import annotations

from paratrain.core.schedules import (
    VEE,
    F,
    I,
    Schedule,
    ScheduleError,
    W,
    lower,
    place_of,
    stage_of,
)

Order = list[tuple[str, int, int]]


def list_schedule(p: int, m: int, v: int, placement: str, bounds: list[int]) -> list[Order]:
    """Per-rank compute orders of F, I and W by ZB-V's priority rule (module docstring);
    ``bounds[r]``: the most chunks rank ``r`` stashes between an F and its W."""
    S = p * v
    done: dict[tuple[str, int, int], int] = {}  # (F or I, micro-batch, stage) -> end tick
    next_f = [[0] * v for _ in range(p)]  # next micro-batch to forward / I / W, per chunk
    next_i = [[0] * v for _ in range(p)]
    pending_w: list[list[tuple[int, int]]] = [[] for _ in range(p)]  # (micro-batch, chunk) after I
    stashed = [0] * p  # chunks between their F and their W
    orders: list[Order] = [[] for _ in range(p)]
    total, tick = 3 * m * v * p, 0
    while sum(len(o) for o in orders) < total:
        if tick > 4 * total:
            raise ScheduleError(f"zero-bubble list scheduler made no progress (p={p}, m={m})")
        now: list[tuple[tuple[str, int, int], tuple[str, int, int]]] = []
        for r in range(p):
            room = stashed[r] < bounds[r]
            pick = _pick(r, p, m, v, placement, S, tick, done, next_f, next_i, pending_w, room)
            if pick is not None:
                now.append(((pick[0], pick[1], pick[2]), (pick[0], pick[1], stage_of(placement, p, r, pick[2]))))
                orders[r].append(pick)
        for (kind, mb, c), key in now:  # results of this tick are visible from the next one
            r = place_of(placement, p, key[2])[0]
            if kind == F:
                next_f[r][c] += 1
                stashed[r] += 1
            elif kind == I:
                next_i[r][c] += 1
                pending_w[r].append((mb, c))
            else:
                stashed[r] -= 1
            if kind != W:
                done[key] = tick + 1
        tick += 1
    return orders


def _pick(r: int, p: int, m: int, v: int, placement: str, S: int, tick: int, done: dict,
          next_f: list[list[int]], next_i: list[list[int]], pending_w: list[list[tuple[int, int]]],
          room: bool) -> tuple[str, int, int] | None:
    """The action rank ``r`` starts at ``tick``, or None (idle)."""
    def ready(key: tuple[str, int, int]) -> bool:
        return key in done and done[key] <= tick

    inputs = []  # I: oldest micro-batch first, then the later stage (closer to the loss)
    for c in range(v):
        mb, s = next_i[r][c], stage_of(placement, p, r, c)
        if mb < m and ready((F, mb, s)) and (s == S - 1 or ready((I, mb, s + 1))):
            inputs.append((mb, -s, c))
    if inputs:
        mb, _, c = min(inputs)
        return (I, mb, c)
    if room:
        forwards = []  # F: the later stage first (it frees memory sooner), then the oldest
        for c in range(v):
            mb, s = next_f[r][c], stage_of(placement, p, r, c)
            if mb < m and (s == 0 or ready((F, mb, s - 1))):
                forwards.append((-s, mb, c))
        if forwards:
            _, mb, c = min(forwards)
            return (F, mb, c)
    if pending_w[r]:
        mb, c = pending_w[r].pop(0)
        return (W, mb, c)
    return None


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1: 1F1B's order with ``B`` replaced by ``I``, and rank ``r``'s ``W`` of micro-batch
    ``j`` placed right after its ``I`` of micro-batch ``j + r`` (the rest at the end): the ``r``
    deferred ``W`` s fill the cool-down gaps of 1F1B. Between F and I at most 1F1B's
    ``min(p - r, m)``; between F and W ``min(p, m)`` on every rank, the first rank's 1F1B peak
    (but the ``r`` extra are halves: a finished I keeps only what its W needs)."""
    orders: list[Order] = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        order: Order = [(F, j, 0) for j in range(warmup)]
        for j in range(m):
            if warmup + j < m:
                order.append((F, warmup + j, 0))
            order.append((I, j, 0))
            if j >= r:
                order.append((W, j - r, 0))
        order += [(W, j, 0) for j in range(max(0, m - r), m)]
        orders.append(order)
    return lower("zb-h1", p, m, 1, orders, [min(p, m)] * p)


def v_pattern(p: int, m: int) -> list[Order]:
    """The paper's hand-made ZB-V order ([Q24] sec. 6, fig. 8) for ``m >= 2p - 1``; chunk 0 of
    rank ``r`` is stage ``r`` (going down), chunk 1 is stage ``2p - 1 - r`` (coming back):

    1. ``2(p - r) - 1`` forwards down, then ``r`` pairs (forward up, forward down): the V fills;
    2. ``p - r`` times forward up, I, W (the first micro-batches come back up at once);
    3. steady state: forward down, I and W down, forward up, I and W up, until every
       forward is done;
    4. cool-down: ``r`` pairs of I (down, up), ``p - r`` times I down and the oldest W down,
       then the W s left.

    A ``W`` right after its ``I`` keeps the stash at ``2p`` chunks and fills the slant without a
    gap of its own, so with ``W`` cheaper than ``F`` (measured on CPU: F : I : W = 1 : 1.1 : 0.65)
    the step is shorter than the list scheduler's, whose unit-tick order leaves ``W``-sized holes
    (simulated: p = 2, m = 8 on the measured costs, bubble 5.4% against 10.9%); with
    ``F = I = W`` it is as short, or shorter from p = 5 on (tested for p <= 8, m <= 24)."""
    orders: list[Order] = []
    for r in range(p):
        order: Order = []
        n = {F: [0, 0], I: [0, 0], W: [0, 0]}  # next micro-batch of each kind, per chunk

        def run(*steps: tuple[str, int], order: Order = order, n: dict[str, list[int]] = n) -> None:
            for kind, c in steps:
                order.append((kind, n[kind][c], c))
                n[kind][c] += 1

        for _ in range(2 * (p - r) - 1):
            run((F, 0))
        for _ in range(r):
            run((F, 1), (F, 0))
        for _ in range(p - r):
            run((F, 1), (I, 1), (W, 1))
        while n[F][1] < m:
            if n[F][0] < m:
                run((F, 0))
            run((I, 0), (W, 0), (F, 1), (I, 1), (W, 1))
        for _ in range(r):
            run((I, 0), (I, 1))
        for _ in range(p - r):
            run((I, 0), (W, 0))
        while n[W][1] < m:
            run((W, 1))
        while n[W][0] < m:
            run((W, 0))
        orders.append(order)
    return orders


def zb_v_orders(p: int, m: int) -> list[Order]:
    """ZB-V's per-rank compute orders (:func:`zb_v` without the transfers; the planner counts
    stashed chunks from them): the paper's pattern (:func:`v_pattern`) where it is made for
    (``m >= 2p - 1``), the list scheduler below that."""
    if m >= 2 * p - 1:
        return v_pattern(p, m)
    return list_schedule(p, m, 2, VEE, [min(2 * p, 2 * m)] * p)


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V: two chunks per rank in the V placement, 1F1B's peak memory (``2p`` chunks)."""
    return lower("zb-v", p, m, 2, zb_v_orders(p, m), [min(2 * p, 2 * m)] * p, placement=VEE)
