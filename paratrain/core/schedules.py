"""Pipeline schedules as plain data: for every pipeline rank, the ordered list of its actions.

Pure Python (no torch): built, checked (:mod:`.check`), simulated (:mod:`.timeline`) and drawn
without starting a process; the runtime (:mod:`paratrain.parallel.pipeline.runtime`) only
executes the lists.

Vocabulary. ``p`` pipeline ranks, ``m`` micro-batches, ``v`` model chunks (virtual stages) per
rank. The model is cut into ``S = p * v`` *stages* in order; stage ``s`` is chunk ``s // p`` of
rank ``s % p`` (Megatron's interleaved placement: rank ``r`` holds stages ``r, r + p, ...``), so
activations flow ``rank r -> r + 1`` and wrap from rank ``p - 1`` back to rank 0 between chunks.

Actions. ``F``/``B``: forward/backward of micro-batch ``microbatch`` through chunk ``chunk``;
``send_act``/``recv_act``: the activation leaving/entering that chunk (to/from the ``peer``
rank); ``send_grad``/``recv_grad``: the gradient of that activation flowing back.

Execution semantics (what the checker proves safe and the runtime does): a rank runs its list in
order; a maximal run of consecutive communication actions is posted as **one batch** and the
rank waits until every transfer of the batch has completed; a transfer completes once both its
send and its receive are posted. Transfers between an ordered pair of ranks are matched in
posting order (first send with first receive: NCCL's and gloo's rule), so the receiver must
expect them in the order they are sent. Generators therefore produce only the *compute order*
of each rank; :func:`lower` adds the transfers (sends right after the producing compute,
receives at the same unit-time boundary, which is deadlock-free by construction).

Bubble (every stage costs ``t_f`` forward and ``t_b`` backward per micro-batch, free transfers):
GPipe and 1F1B take ``(m + p - 1)(t_f + t_b)`` for ``m(t_f + t_b)`` of work per rank, an idle
fraction ``(p - 1) / (m + p - 1)``; interleaving ``v`` chunks shrinks each fill/drain step to
``1/v`` of a stage: ``(p - 1) / (v m + p - 1)`` (Narayanan et al. 2021, section 2.2) -- the
formula of :func:`paratrain.core.bubble.bubble_fraction`, which the tests check against
:func:`.timeline.simulate`.
"""

from __future__ import annotations

from dataclasses import dataclass

F, B, I, W = "F", "B", "I", "W"
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "send_act", "recv_act", "send_grad", "recv_grad"
COMPUTE = (F, B, I, W)
GRAD = (B, I)  # the computes that produce the gradient of the chunk's input
SENDS = (SEND_ACT, SEND_GRAD)
RECVS = (RECV_ACT, RECV_GRAD)
KINDS = COMPUTE + SENDS + RECVS
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "forward")
LOOP, VEE = "loop", "v"  # placements of stages on ranks (see :func:`stage_of`)


def placement_of(name: str) -> str:
    """The stage placement a schedule uses: ZB-V's V shape, Megatron's loop for the others."""
    return VEE if name == "zb-v" else LOOP


def stage_of(placement: str, p: int, rank: int, chunk: int) -> int:
    """Stage held by ``chunk`` of ``rank``. Loop: ``chunk * p + rank`` (rank r holds r, r + p, ...).
    V (two chunks): chunk 0 of rank r is stage r, chunk 1 is stage ``2p - 1 - r``, so the
    activations flow down the ranks and back up, and rank 0 holds the first and the last stage."""
    if placement == VEE:
        return rank if chunk == 0 else 2 * p - 1 - rank
    return chunk * p + rank


def place_of(placement: str, p: int, stage: int) -> tuple[int, int]:
    """(rank, chunk) holding ``stage`` (the inverse of :func:`stage_of`)."""
    if placement == VEE:
        return (stage, 0) if stage < p else (2 * p - 1 - stage, 1)
    return stage % p, stage // p


class ScheduleError(ValueError):
    """A schedule breaks a rule (deadlock, mismatched transfer, missing or repeated action...)."""


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a pipeline rank. ``chunk`` is always this rank's chunk (the one whose output
    is sent / whose input is received); ``peer`` is the other pipeline rank of a transfer (None
    for compute). ``str`` gives a short label: ``F3`` (micro-batch 3), ``B3.1`` (chunk 1)."""

    kind: str
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    def __str__(self) -> str:
        chunk = f".{self.chunk}" if self.chunk else ""
        if self.is_compute:
            return f"{self.kind}{self.microbatch}{chunk}"
        return f"{self.kind}{self.microbatch}{chunk}@{self.peer}"


@dataclass(frozen=True)
class Schedule:
    """Per pipeline rank, the ordered actions of one training step, plus the bound on stashed
    activations (micro-batch chunks forwarded but not yet backwarded) the schedule promises."""

    name: str
    num_ranks: int
    num_microbatches: int
    num_chunks: int
    ranks: tuple[tuple[Action, ...], ...]
    in_flight_bound: tuple[int, ...]
    has_backward: bool = True
    placement: str = LOOP

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.num_chunks

    def stage(self, rank: int, chunk: int) -> int:
        return stage_of(self.placement, self.num_ranks, rank, chunk)

    def place(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding ``stage``."""
        return place_of(self.placement, self.num_ranks, stage)

    def compute_order(self, rank: int) -> list[Action]:
        return [a for a in self.ranks[rank] if a.is_compute]


def _send_after(kind: str, mb: int, c: int, r: int, p: int, v: int, placement: str = LOOP) -> Action | None:
    """The transfer a compute produces: its activation to the next stage, or its input gradient
    to the previous one (none past the ends of the model, none when that stage is on this rank:
    the V placement's turn on rank p - 1 hands the tensor over in memory)."""
    s = stage_of(placement, p, r, c)
    if kind == F and s < p * v - 1:
        peer = place_of(placement, p, s + 1)[0]
        return Action(SEND_ACT, mb, c, peer) if peer != r else None
    if kind in GRAD and s > 0:
        peer = place_of(placement, p, s - 1)[0]
        return Action(SEND_GRAD, mb, c, peer) if peer != r else None
    return None


def _ticks(orders: list[list[tuple[str, int, int]]], p: int, v: int, placement: str = LOOP) -> list[list[int]]:
    """Unit-time start tick of every compute: one tick each, after the previous compute of its
    rank and after the compute (on the neighbouring stage) whose output it consumes."""
    ticks: list[list[int]] = [[] for _ in orders]
    finished: dict[tuple[str, int, int], int] = {}  # (F or "G", microbatch, stage) -> end tick
    progress = True
    while progress:
        progress = False
        for r, order in enumerate(orders):
            while len(ticks[r]) < len(order):
                kind, mb, c = order[len(ticks[r])]
                s = stage_of(placement, p, r, c)
                source = (F, mb, s - 1) if kind == F else ("G", mb, s + 1)
                needs_input = (kind == F and s > 0) or (kind in GRAD and s < p * v - 1)
                if needs_input and source not in finished:
                    break
                start = max(ticks[r][-1] + 1 if ticks[r] else 0, finished[source] if needs_input else 0)
                ticks[r].append(start)
                finished[(F if kind == F else "G", mb, s)] = start + 1
                progress = True
    for r, order in enumerate(orders):
        if len(ticks[r]) < len(order):
            raise ScheduleError(f"rank {r} waits forever before {order[len(ticks[r])]}: the compute "
                                f"orders depend on each other in a cycle")
    return ticks


def lower(name: str, p: int, m: int, v: int, orders: list[list[tuple[str, int, int]]],
          in_flight_bound: list[int], has_backward: bool = True, placement: str = LOOP) -> Schedule:
    """Add the transfers to per-rank compute orders (``(kind, microbatch, chunk)`` triples).

    Bulk-synchronous placement on the unit-time ticks of :func:`_ticks`: a tensor computed in
    tick ``t`` is sent right after its compute, and its receive is posted by the receiver at the
    same tick boundary ``t + 1`` (after its last compute before ``t + 1``). Every transfer then
    meets its partner at the same boundary, which rules out deadlock under the blocking batch
    semantics whatever the real durations (induction over boundaries: every batch only waits on
    batches of boundaries it has reached), and each channel carries at most one tensor per
    boundary, so receives are posted in sending order. :mod:`.check` verifies both anyway."""
    ticks = _ticks(orders, p, v, placement)
    recvs: list[list[tuple[int, int, Action]]] = [[] for _ in range(p)]  # (boundary, src, action)
    for r, order in enumerate(orders):
        for (kind, mb, c), t in zip(order, ticks[r]):
            send = _send_after(kind, mb, c, r, p, v, placement)
            if send is not None:
                s = stage_of(placement, p, r, c) + (1 if send.kind == SEND_ACT else -1)  # receiving stage
                recv = Action(RECV_ACT if send.kind == SEND_ACT else RECV_GRAD, mb, place_of(placement, p, s)[1], r)
                recvs[send.peer].append((t + 1, r, recv))
    ranks = []
    for r, order in enumerate(orders):
        pending = sorted(recvs[r], key=lambda x: (x[0], x[1]))
        acts: list[Action] = []
        j = 0
        for (kind, mb, c), t in zip(order, ticks[r]):
            while j < len(pending) and pending[j][0] <= t:
                acts.append(pending[j][2])
                j += 1
            acts.append(Action(kind, mb, c))
            send = _send_after(kind, mb, c, r, p, v, placement)
            if send is not None:
                acts.append(send)
        if j < len(pending):
            raise ScheduleError(f"rank {r} never uses {pending[j][2]}")
        ranks.append(tuple(acts))
    return Schedule(name, p, m, v, tuple(ranks), tuple(in_flight_bound), has_backward, placement)


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): every forward, then every backward. Stashes all ``m``."""
    orders = [[(F, i, 0) for i in range(m)] + [(B, i, 0) for i in range(m)] for _ in range(p)]
    return lower("gpipe", p, m, 1, orders, [m] * p)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B / PipeDream-flush (Narayanan et al. 2021): rank ``r`` runs ``w = min(p - r - 1, m)``
    warm-up forwards, then alternates one forward and one backward, then drains the last ``w``
    backwards. Same bubble as GPipe, but at most ``min(p - r, m) <= p`` activations stashed."""
    orders = []
    for r in range(p):
        w = min(p - r - 1, m)
        order = [(F, i, 0) for i in range(w)]
        for i in range(m - w):
            order += [(F, w + i, 0), (B, i, 0)]
        order += [(B, i, 0) for i in range(m - w, m)]
        orders.append(order)
    return lower("1f1b", p, m, 1, orders, [min(p - r, m) for r in range(p)])


def interleaved(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2), needs ``m % p == 0``.

    The k-th forward of a rank (k = 0 .. v*m - 1) is micro-batch ``(k // (p v)) p + k % p`` of
    chunk ``(k // p) % v`` (groups of ``p`` micro-batches go through chunk 0, then chunk 1, ...);
    the k-th backward is the same micro-batch of chunk ``v - 1 - (k // p) % v``. Rank ``r`` runs
    ``w = min(v m, 2 (p - r - 1) + (v - 1) p)`` warm-up forwards, then alternates, then drains.
    Stashes at most ``w + 1`` micro-batch chunks (each ``1/v`` of a stage's activations)."""
    if m % p or (p == 1 and v > 1):
        raise ScheduleError(f"the interleaved schedule needs pp >= 2 (got {p}) and microbatches ({m}) "
                            f"a multiple of pp")
    total = v * m

    def unit(k: int, forward: bool) -> tuple[int, int]:
        mb = (k // (p * v)) * p + k % p
        c = (k // p) % v
        return mb, (c if forward else v - 1 - c)

    orders, bounds = [], []
    for r in range(p):
        w = min(total, 2 * (p - r - 1) + (v - 1) * p)
        order = [(F, *unit(k, True)) for k in range(w)]
        for k in range(total - w):
            order += [(F, *unit(w + k, True)), (B, *unit(k, False))]
        order += [(B, *unit(k, False)) for k in range(total - w, total)]
        orders.append(order)
        bounds.append(min(total, w + 1))
    return lower("interleaved", p, m, v, orders, bounds)


def forward_only(p: int, m: int, v: int = 1, placement: str = LOOP) -> Schedule:
    """Forwards only (evaluation): micro-batches in order through every chunk, nothing stashed."""
    orders = [[(F, i, c) for c in range(v) for i in range(m)] for _ in range(p)]
    return lower("forward", p, m, v, orders, [0] * p, has_backward=False, placement=placement)


def build_schedule(name: str, p: int, m: int, v: int = 1, placement: str = LOOP) -> Schedule:
    """The schedule called ``name`` (``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zb-v``,
    ``forward``). ``zb-v`` always has two chunks per rank (``v`` is ignored)."""
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    if name in ("zb-h1", "zb-v"):
        from paratrain.core import zero_bubble  # builds on lower(): imported here, not at the top
        return zero_bubble.zb_h1(p, m) if name == "zb-h1" else zero_bubble.zb_v(p, m)
    if name == "forward":  # ``placement``: that of the training schedule it evaluates for
        return forward_only(p, m, v, placement)
    raise ScheduleError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
