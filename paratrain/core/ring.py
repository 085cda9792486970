"""What one device sends in a collective, and in how many latency-bound steps: the ring
algorithms (Patarasuk & Yuan 2009, [P17]) that NCCL and gloo use for large tensors. Pure Python
(no torch): :mod:`paratrain.comm` counts every call's wire bytes with :func:`wire_bytes`, the
traffic formulas (:mod:`.traffic`) and the planner price with the same function.

Payload ``S`` as :mod:`paratrain.comm` counts it (all-reduce: its input; reduce-scatter: its
input; all-gather: its output; a send or broadcast: its tensor), ``n`` the group size::

    op              wire bytes per device     steps
    all_reduce      2 (n - 1)/n S             2 (n - 1)    a reduce-scatter, then an all-gather
    reduce_scatter  (n - 1)/n S               n - 1        n - 1 chunks of S/n
    all_gather      (n - 1)/n S               n - 1
    send            S                         1
    broadcast       S on the root             -            a lower bound; the others send 0
    all_to_all      (n - 1)/n S               n - 1        equal splits; each keeps its own 1/n

[P17] Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations",
JPDC 2009.
"""

from __future__ import annotations

# Multiples of (n - 1)/n S one device sends; None: the whole payload, whatever n.
_RING_FACTOR: dict[str, int | None] = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "send": None,
                                       "broadcast": None, "all_to_all": 1}


def wire_bytes(op: str, n: int, payload: float) -> float:
    """Bytes one device sends for ``op`` of ``payload`` bytes over ``n`` devices (the table
    above; a broadcast: what its root sends). A collective on a group of one sends nothing."""
    factor = _RING_FACTOR[op]
    if factor is None:
        return float(payload)
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * payload


def ring_steps(op: str, n: int) -> int:
    """Latency-bound steps of a ring collective: all-reduce 2(n - 1), reduce-scatter and
    all-gather n - 1, send 1 ([P17]). 0 on a group of one."""
    if n <= 1:
        return 0
    return {"all_reduce": 2 * (n - 1), "reduce_scatter": n - 1, "all_gather": n - 1, "send": 1,
            "all_to_all": n - 1}[op]
