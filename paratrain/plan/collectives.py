"""How long communication takes on a link: ring collectives, gradient buckets, and the part of
the data-parallel reduction that the last backward does not hide. Pure Python (no torch).

A collective of S bytes over n devices takes ``wire(S) / bandwidth + steps * latency`` with the
ring algorithms' wire bytes and steps ([P17] Patarasuk & Yuan 2009): all-reduce ``2(n-1)/n S``
in ``2(n-1)`` steps, all-gather / reduce-scatter ``(n-1)/n S`` in ``n-1``, a send ``S`` in 1
(:mod:`paratrain.core.ring`, the function ``comm`` counts the runtime's bytes with). Which
collectives data parallelism runs per step: :func:`paratrain.core.traffic.dp_parts`.
"""

from __future__ import annotations

from typing import NamedTuple

from paratrain.core.ring import ring_steps, wire_bytes
from paratrain.plan.hardware import Hardware


class Link(NamedTuple):
    """A link as collectives see it: bandwidth (bytes/s), latency per ring step (s), how many
    times the ring's bandwidth time the backend's reduce-scatter and all-gather take, and what a
    blocking collective costs more inside a training step (seconds per payload byte and per
    call: ``Hardware.tp_extra_s_per_byte`` / ``tp_extra_s_per_call``; 0 elsewhere)."""

    bw: float
    latency: float
    reduce_scatter_slowdown: float = 1.0
    all_gather_slowdown: float = 1.0
    extra_s_per_byte: float = 0.0
    extra_s_per_call: float = 0.0


def link(hw: Hardware, cross: bool) -> Link:
    """The inter-node link if the group spans nodes, else the intra-node one."""
    bw, lat = (hw.inter_node_bw, hw.inter_node_latency_s) if cross else (hw.intra_node_bw, hw.intra_node_latency_s)
    return Link(bw, lat, hw.reduce_scatter_slowdown, hw.all_gather_slowdown)


def collective_seconds(op: str, n: int, payload: float, bw: float, latency: float, rs_slowdown: float = 1.0,
                       ag_slowdown: float = 1.0, extra_s_per_byte: float = 0.0, extra_s_per_call: float = 0.0,
                       *, calls: int = 1) -> float:
    """``calls`` ring collectives moving ``payload`` bytes in all over ``n`` devices (a send: one
    step each), on a :class:`Link` (pass it unpacked: ``*link``). 0 on a group of one."""
    if op != "send" and n <= 1:
        return 0.0
    slow = rs_slowdown if op == "reduce_scatter" else ag_slowdown if op == "all_gather" else 1.0
    return (slow * wire_bytes(op, n, payload) / bw + calls * ring_steps(op, max(n, 2)) * latency
            + payload * extra_s_per_byte + calls * extra_s_per_call)


class Buckets(NamedTuple):
    """A payload reduced in ``count`` buckets: all but the last take ``full_s``, the last
    (partial) one ``last_s``."""

    count: int
    full_s: float
    last_s: float

    @property
    def total_s(self) -> float:
        return (self.count - 1) * self.full_s + self.last_s if self.count else 0.0


NO_BUCKETS = Buckets(0, 0.0, 0.0)


def chain_buckets(first: Buckets, last: Buckets) -> Buckets:
    """Two bucket runs on one link as one, ``last``'s final bucket the last to go (the
    experts' buckets, reduced over their own group, and then the rest's): same count, same total
    seconds, the run's final bucket ``last``'s."""
    if not first.count or not last.count:
        return last if last.count else first
    count = first.count + last.count
    return Buckets(count, (first.total_s + last.total_s - last.last_s) / (count - 1), last.last_s)


def buckets(op: str, n: int, payload: float, bucket_bytes: float, *link: float) -> Buckets:
    """The collectives of ``payload`` bytes reduced in buckets of ``bucket_bytes`` on ``link``
    (a :class:`Link`, unpacked)."""
    if n <= 1 or payload <= 0:
        return NO_BUCKETS
    full, rest = divmod(payload, bucket_bytes)
    count = int(full) + (1 if rest > 0 else 0)
    last = rest if rest > 0 else bucket_bytes
    return Buckets(count, collective_seconds(op, n, bucket_bytes, *link),
                   collective_seconds(op, n, last, *link))


def exposed_reduction(b: Buckets, window_s: float, overlap: bool = True) -> float:
    """Seconds the data-parallel reduction runs past the end of the step's last backward.

    The runtime (``parallel/data.py``) fills buckets in reverse parameter order, the order in
    which backward produces gradients, and launches each the moment it is complete, one after
    the other on the link. Gradients are taken to appear uniformly over the ``window_s`` of the
    last backward, so bucket i (of K) is ready at ``r_i = W (i + 1) / K`` and
    ``end = max(end, r_i) + d_i``; unrolled, ``end = max_i (r_i + sum_{j >= i} d_j)``, which with
    equal buckets is attained at i = 0 or i = K - 1:

        end = max(W / K + (K - 1) d + d_last,  W + d_last),    exposed = end - W

    One bucket (a small model) is fully exposed; many hide all but the last. ``overlap=False``
    (or no window): everything is exposed."""
    if not b.count:
        return 0.0
    if not overlap or window_s <= 0:
        return b.total_s
    K, W = b.count, window_s
    end = max(W / K + (K - 1) * b.full_s + b.last_s, W + b.last_s)
    return end - W
