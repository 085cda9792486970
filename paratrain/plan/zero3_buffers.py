"""ZeRO-3's transient bytes on one rank: the units gathered whole and the gradient buckets that
exist only during a backward, as the runtime allocates and frees them (pure Python, no torch).

Without a pipeline (``parallel/zero3.py``) the root R (embeddings, final norm, head) is whole
through each micro-batch's forward and backward, a block B around its own, the next block
prefetched; a unit's gradient bucket is allocated at its first gradient and launched when
complete, and launching one first settles the one before (at most one reduction in flight,
``ZeroDataParallel._launch``). The root's bucket gets the final norm's gradient first and the
token embedding's last, so it lives through the whole backward. During block j's backward (L
blocks, the last first) the root, block j and block j - 1 (prefetched, j >= 1) are whole, and
the root's, block j's and block j + 1's (in flight, j <= L - 2) buckets allocated::

    max_j  P (R + B + [j >= 1] B) + G (R + B + [j <= L - 2] B)  =  (P + G)(R + 2 B)  for L >= 3

measured to the byte (tests/distributed/test_zero3_pipeline.py, ``no-pipeline-dp4``). Until
2026-12-02 the runtime settled the launched reductions only when the backward was over, and
held every unit's gradient at its end (``G psi``, 2.83x the price of one unit on ``tiny``).

Inside a pipeline per micro-batch (``parallel/zero3_pipeline.py``) a unit is each module of the
rank's chunks (each block; the token and position embeddings, final norm and head where the
chunk has them). With the chunk's units ``u_0, u_1, ...`` in backward order:

* a backward ``B`` uses ``u_j`` while ``u_{j+1}`` is prefetched, fills ``u_j``'s bucket while
  ``u_{j-1}``'s is reduced (one reduction in flight, as without a pipeline):
  ``max_j P (u_j + u_{j+1}) + G (u_{j-1} + u_j)``; the last one stays in flight into the next F;
* a zero-bubble ``I`` computes the norms' and biases' gradients of every block (and the final
  norm's) but no linear weight's, so no bucket is complete: they stay allocated until the rank's
  next backward action starts (``set_sync``), ``max_j P (u_j + u_{j+1}) + G sum_{i <= j} u_i^I``;
  where the schedule runs an F before that next backward (``pending_after_i``), that F's two
  units join them; a ``W`` needs no parameter and fills buckets as a ``B`` does.

Measured to the byte on ``tiny`` (dp 2 x pp 2: 1F1B, interleaved, ZB-H1, ZB-V, every rank;
``tests/distributed/test_zero3_pipeline.py::test_zero3_transient_bytes_are_the_planners``) and
by hand on ``small`` (the same layouts), but 2 KiB over on ZB-V's rank 0 (its final norm's
bucket priced as kept into an F).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from paratrain.core.traffic import zero3_per_step
from paratrain.models.configs import ModelConfig
from paratrain.plan.topology import PipelineShape

ZERO_BUBBLE = ("zb-h1", "zb-v")


class Unit(NamedTuple):
    params: float  # on one device
    in_i: bool  # gets a gradient in a zero-bubble I (norms, biases), not only in W


class RankUnits(NamedTuple):
    """What :func:`zero3_buffer_bytes` needs of a pipeline rank: its chunks' units in backward
    order, whether its backward is split into I and W, whether an F follows an I before the
    rank's next backward, and (no pipeline) its blocks and block size."""

    chunks: tuple[tuple[Unit, ...], ...]
    split: bool
    pending: bool
    layers: int
    block: float


def rank_units(model: ModelConfig, shape: PipelineShape, i: int, block: float, embed: float, schedule: str,
               pending: bool) -> RankUnits:
    """The ZeRO-3 units of pipeline rank ``i`` (``shape``'s chunks), in backward order by chunk:
    the head and final norm on the last stage, the blocks, the position and token embeddings on
    the first (a tied head that is not a copy, ZB-V's rank 0, is the embedding's unit again)."""
    gpt = model.family == "gpt"  # learned positions and a LayerNorm bias; Llama: rotary, RMSNorm
    S = len(shape.chunks)
    chunks = []
    for k in reversed(shape.rank_stages[i]):
        units = [Unit(embed, False), Unit((2 if gpt else 1) * model.hidden, True)] if k == S - 1 else []
        units += [Unit(block, True)] * shape.chunks[k]
        units += ([Unit(model.max_seq_len * model.hidden, False)] if gpt else []) + [Unit(embed, False)] \
            if k == 0 else []
        chunks.append(tuple(units))
    return RankUnits(tuple(chunks), schedule in ZERO_BUBBLE, pending, shape.layers[i], block)


def zero3_buffer_bytes(zero: int, r: int, pp: int, P_b: float, G_b: float, params: float,
                       gather: str = "microbatch", units: RankUnits | None = None) -> float:
    """ZeRO-3's transient bytes on a rank of ``params`` parameters sharded over ``r`` ranks
    (``P_b`` / ``G_b`` bytes a parameter / a gradient): inside a pipeline gathered once per step
    (``gather`` "step") the rank's whole parameters and gradients through the step; else the
    module docstring's peak of ``units``."""
    if zero != 3 or r == 1:
        return 0.0
    if zero3_per_step(zero, pp, gather):
        return (P_b + G_b) * params
    assert units is not None
    if pp == 1:
        return _no_pipeline_peak(units, params, P_b, G_b)
    return _pipeline_peak(units, P_b, G_b)


def _no_pipeline_peak(units: RankUnits, params: float, P_b: float, G_b: float) -> float:
    """The module docstring's peak without a pipeline: the root, and blocks ``j`` (in use),
    ``j - 1`` (prefetched) and ``j + 1`` (its reduction in flight) during block ``j``'s backward."""
    L, B = units.layers, units.block
    R = max(0.0, params - L * B)
    if L < 2:  # no neighbour block to prefetch or to reduce
        return (P_b + G_b) * (R + L * B)
    if L == 2:  # block 1 prefetches block 0, block 0 reduces block 1: one of the two extra blocks
        return (P_b + G_b) * (R + B) + max(P_b, G_b) * B
    return (P_b + G_b) * (R + 2 * B)  # a middle block: both (closed form of the max over j)


def _pipeline_peak(units: RankUnits, P_b: float, G_b: float) -> float:
    """The module docstring's per micro-batch peak over the rank's chunks."""
    def at(u: tuple[Unit, ...], j: int) -> float:
        return u[j].params if 0 <= j < len(u) else 0.0

    pair = max(at(u, j) + at(u, j + 1) for u in units.chunks for j in range(len(u)))
    backward = max(G_b * (at(u, j - 1) + at(u, j)) + (0.0 if units.split else P_b * (at(u, j) + at(u, j + 1)))
                   for u in units.chunks for j in range(len(u)))  # B, or W (no parameter)
    if not units.split:  # and the F after a backward, with its last reduction in flight
        return max(backward, P_b * pair + G_b * max(u[-1].params for u in units.chunks))
    peak = backward
    for u in units.chunks:
        kept = 0.0
        for j in range(len(u)):
            kept += u[j].params if u[j].in_i else 0.0
            peak = max(peak, P_b * (at(u, j) + at(u, j + 1)) + G_b * kept)
    if units.pending:
        peak = max(peak, P_b * pair + G_b * max(sum(x.params for x in u if x.in_i) for u in units.chunks))
    return peak


@lru_cache(maxsize=4096)
def pending_after_i(schedule: str, p: int, m: int, v: int, placement: str, rank: int) -> bool:
    """Whether ``rank`` runs an F after an I with no backward action (B, I, W) in between: the
    I's gradient buckets are still allocated during that F (they are reduced when the next
    backward action starts)."""
    if schedule not in ZERO_BUBBLE or p == 1:
        return False
    from paratrain.core.schedules import build_schedule

    # The answer is the schedule's warm-up and steady state: the same for every m >= 4p + 4
    # (checked against the whole schedule for p <= 6, m <= 8p); building a schedule of a million
    # micro-batches for it made `plan --global-batch 1000000000` run for minutes.
    kept = False
    for a in build_schedule(schedule, p, min(m, 4 * p + 4), v, placement).ranks[rank]:
        if not a.is_compute:
            continue
        if a.kind == "F":
            if kept:
                return True
        else:
            kept = a.kind == "I"
    return False
