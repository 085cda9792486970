"""Which link each parallel axis uses, and how layers are split into pipeline chunks.

Ranks are placed as in :mod:`paratrain.mesh` (tp innermost, then cp, dp, pp outermost)::

    rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index,   node = rank // devices_per_node

A group whose members all sit on one node talks over the intra-node link (NVLink, shared
memory); if any group of an axis spans nodes, that axis is costed at the inter-node rate (its
collectives are as slow as their slowest group, since every step waits for all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from paratrain.core import traffic
from paratrain.core.bubble import in_flight_microbatches as f_in_flight
from paratrain.core.partition import stage_sizes
from paratrain.core.schedules import stage_of
from paratrain.core.zero_bubble import zb_v_orders
from paratrain.errors import ConfigError
from paratrain.mesh import MeshShape
from paratrain.models.configs import ModelConfig


@lru_cache(maxsize=8192)
def axis_spans_nodes(axis: str, dp: int, pp: int, tp: int, devices_per_node: int, cp: int = 1) -> bool:
    """True if some ``axis`` group of the ``dp x pp x cp x tp`` mesh has members on two nodes.

    An ``axis`` group is ``size`` ranks ``stride`` apart (tp: stride 1; cp: stride tp; dp: stride
    cp*tp; pp: stride dp*cp*tp). Group starts are the first ``stride`` ranks of every block of ``stride * size`` ranks;
    whether a group crosses a node boundary depends only on its start modulo the node size, so
    the starts of lcm(block, node) / block blocks cover every case."""
    D = devices_per_node
    shape = MeshShape(dp=dp, pp=pp, tp=tp, cp=cp)
    size = shape.size(axis)
    if size == 1:
        return False
    stride = shape.stride(axis)
    if stride * (size - 1) >= D:
        return True  # the first and last member of every group are at least a node apart
    block = stride * size
    blocks = min(shape.world_size // block, math.lcm(block, D) // block)
    for k in range(blocks):
        for j in range(stride):
            first = k * block + j
            if first // D != (first + stride * (size - 1)) // D:
                return True
    return False


@dataclass(frozen=True)
class PipelineShape:
    """Layers of each chunk and each pipeline rank, sends, and which ranks are alike.

    ``groups`` lists (first rank, number of ranks) of runs of ranks with the same chunks, sends,
    speed and first/last role; within a run only the in-flight count differs, and it never grows
    with the rank index (see :func:`paratrain.core.bubble.in_flight_microbatches`), so the first rank of a run
    holds the most memory and every rank of it takes the same time."""

    chunks: tuple[int, ...]  # layers of stage s (chunk c of rank i holds stage rank_stages[i][c])
    layers: tuple[int, ...]  # per pipeline rank
    sends: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]
    rank_stages: tuple[tuple[int, ...], ...] = ()  # stages of rank i, by chunk (c * pp + i in the loop)

    def holds(self, rank: int, stage: int) -> bool:
        return stage in self.rank_stages[rank]


@lru_cache(maxsize=4096)
def pipeline_shape(model: ModelConfig, seq_len: int, pp: int, virtual_stages: int,
                   stage_layers: tuple[int, ...] | None = None, stage_speeds: tuple[float, ...] | None = None,
                   rank_speeds: tuple[float, ...] | None = None, placement: str = "loop") -> PipelineShape:
    """The runtime's partition (given ``stage_layers``, or balanced by FLOPs and ``stage_speeds``:
    the very function ``paratrain train`` uses) and the ranks grouped by alikeness; ``placement``
    of the stages on the ranks as in :func:`paratrain.core.schedules.stage_of` (ZB-V's "v")."""
    S = pp * virtual_stages
    chunks = tuple(stage_layers) if stage_layers else stage_sizes(model, pp, virtual_stages, seq_len,
                                                                   stage_speeds=stage_speeds, placement=placement)
    if len(chunks) != S or sum(chunks) != model.num_layers or min(chunks) < 1:
        raise ConfigError(f"stage_layers {chunks} must give {S} chunks of >= 1 layer summing to {model.num_layers}.")
    rank_stages = tuple(tuple(stage_of(placement, pp, i, c) for c in range(virtual_stages)) for i in range(pp))
    layers = [sum(chunks[k] for k in stages) for stages in rank_stages]
    sends = traffic.p2p_sends_per_microbatch(pp, virtual_stages, placement)
    speeds = rank_speeds or (1.0,) * pp

    def signature(i: int) -> tuple:
        stages = rank_stages[i]
        return (tuple(chunks[k] for k in stages), 0 in stages, S - 1 in stages, sends[i], speeds[i])

    groups: list[list[int]] = []
    for i in range(pp):
        if groups and signature(groups[-1][0]) == signature(i):
            groups[-1][1] += 1
        else:
            groups.append([i, 1])
    return PipelineShape(chunks, tuple(layers), sends, tuple((i, c) for i, c in groups), rank_stages)


def _visits(K: int, chunk: int, pp: int, virtual_stages: int) -> int:
    """How many of the first K forwards of an interleaved rank go through ``chunk``: forward k
    visits chunk (k // pp) mod v, so each period of pp v forwards visits every chunk pp times."""
    q, r = divmod(K, pp * virtual_stages)
    return q * pp + min(pp, max(0, r - chunk * pp))


@lru_cache(maxsize=4096)
def stash_states(schedule: str, pp: int, microbatches: int, virtual_stages: int, rank: int
                 ) -> tuple[tuple[int, ...], ...]:
    """The activations pipeline rank ``rank`` holds as its schedule runs, as micro-batch counts per
    chunk after each forward (the only moments a peak can occur), keeping the maximal ones.

    The schedules of :mod:`paratrain.core.schedules`: a forward of chunk c stashes
    one micro-batch's activations of c, its backward frees them. One chunk per rank: the closed
    form of :func:`paratrain.core.bubble.in_flight_microbatches`. Interleaved (v chunks, which may hold
    different layers, the embedding or the head, so which of them are in flight matters): rank r
    runs w = min(v m, 2(p - r - 1) + (v - 1) p) warm-up forwards, then alternates; after its j-th
    forward (j >= w) it has run forwards 0..j and backwards 0..j-w-1, the k-th forward visiting
    chunk (k // p) mod v and the k-th backward chunk v - 1 - (k // p) mod v. The state repeats
    every p v forwards, so one period gives every state (tested against the generated schedule)."""
    v, p, m = virtual_stages, pp, microbatches
    if v == 1 or p == 1:
        return ((int(f_in_flight(schedule, p, m, 1, rank)),),)
    if schedule == "zb-v":  # from the schedule itself: chunks between their F and their W
        return _zb_v_states(p, min(m, 2 * p), v)[rank]
    total = v * m
    w = min(total, 2 * (p - rank - 1) + (v - 1) * p)
    states = set()
    for j in range(min(w, total - 1), min(total, w + p * v)):
        done_f, done_b = j + 1, max(0, j - w)
        states.add(tuple(_visits(done_f, c, p, v) - _visits(done_b, v - 1 - c, p, v) for c in range(v)))
    maximal = [s for s in states if not any(o != s and all(a >= b for a, b in zip(o, s)) for o in states)]
    return tuple(sorted(maximal))


@lru_cache(maxsize=256)
def _zb_v_states(pp: int, microbatches: int, virtual_stages: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """:func:`stash_states` of every rank of a ZB-V schedule, from its list scheduler's compute
    orders (those of ``build_schedule("zb-v", ...)`` without the transfers ``lower`` adds: tested)."""
    orders = zb_v_orders(pp, microbatches)
    return tuple(_scanned_states(orders[rank], virtual_stages) for rank in range(pp))


def _scanned_states(order: list, v: int) -> tuple[tuple[int, ...], ...]:
    """The maximal per-chunk stash states along a compute order of (kind, micro-batch, chunk)
    (F stashes, B or W frees)."""
    live, states = [0] * v, set()
    for kind, _, chunk in order:
        if kind == "F":
            live[chunk] += 1
            states.add(tuple(live))
        elif kind in ("B", "W"):
            live[chunk] -= 1
    maximal = [s for s in states if not any(o != s and all(x >= y for x, y in zip(o, s)) for o in states)]
    return tuple(sorted(maximal))


def peak_stash(schedule: str, pp: int, microbatches: int, virtual_stages: int, rank: int,
               chunk_bytes: tuple[float, ...]) -> float:
    """Peak bytes of activations rank ``rank`` stashes, given each chunk's bytes per micro-batch."""
    return max(sum(n * b for n, b in zip(state, chunk_bytes))
               for state in stash_states(schedule, pp, microbatches, virtual_stages, rank))
