"""The planner's price of context parallelism (ring attention, ``parallel/context.py``). Pure
Python (no torch).

Per block, per micro-batch of ``b`` sequences, on one of the ``N`` cp ranks (``c = s / 2N`` tokens
per chunk, ``t`` = tp, ``h`` hidden):

* **compute**: the per-token work (every matmul but the scores) is ``1/N`` of the sequence's;
  the scores are the ring's blocks (:func:`paratrain.parallel.context.ring_blocks`): ``2N + 1``
  blocks of ``c x c`` per rank (the diagonal step's ``3 c^2``, every other step ``2 c^2``), the
  same on every rank (the causal balance of chunks ``i`` and ``2N - 1 - i``), where a causal
  kernel skipping masked blocks would need ``2N`` of them per rank. The cost model prices one
  device's attention as the dense ``s x s`` (``formulas.attention_core_forward_flops``), so a cp
  rank is priced ``1/N`` of that times ``(2N + 1) / 2N``: the ring's extra over an ideal causal
  split, not credited with the masked half a single device's kernel would skip too;
* **ring**: ``N - 1`` hops of the K/V message (``cp_kv_bytes``) in forward, each hidden behind one
  step's block, ``4 b (2 c^2) h / t`` FLOPs; in backward ``N - 1`` K/V hops and ``N`` dK/dV hops
  (fp32) behind blocks of twice that work, the last dK/dV hop exposed; a replayed forward
  (recomputation) adds its forward ring again. Where transfers cannot hide (CPU ranks that own
  every core: :func:`paratrain.plan.cost.overlaps_dp`'s rule) the whole transfer is exposed;
* **memory**: activations of ``s / N`` tokens, no ``s x s`` scores (the ring keeps the
  log-sum-exp per row, like a fused kernel);
* **gradients** of replicated parameters are averaged over the ``dp x cp`` ranks
  (``Mesh.dpcp``): the data-parallel collectives over ``dp N`` ranks.

The bytes are :func:`paratrain.core.traffic.cp_traffic`'s, the formula the runtime is tested
against.
"""

from __future__ import annotations

from typing import NamedTuple

from paratrain.core import traffic
from paratrain.core.ring import wire_bytes
from paratrain.models.configs import ModelConfig
from paratrain.plan.collectives import Link, collective_seconds


def score_fraction(cp: int) -> float:
    """One cp rank's attention-score work as a share of one device's, in the cost model's dense
    convention: ``(1/N) (2N + 1) / 2N`` (module docstring); 1 without context parallelism."""
    return 1.0 if cp == 1 else (2 * cp + 1) / (2 * cp * cp)


class Ring(NamedTuple):
    """One block's ring, per micro-batch: exposed seconds in forward and backward, wire bytes sent."""

    forward_s: float
    backward_s: float
    wire_bytes: float


NO_RING = Ring(0.0, 0.0, 0.0)


def ring_cost(model: ModelConfig, cp: int, tp: int, b: float, s: int, elem_bytes: int, rate: float,
              cp_link: Link, recompute: str, overlap: bool) -> Ring:
    """The ring of one block (module docstring); ``rate`` FLOP/s of one device."""
    if cp == 1:
        return NO_RING
    kv = traffic.cp_kv_bytes(model, cp, tp, b, s, elem_bytes)
    dkv = traffic.cp_kv_bytes(model, cp, tp, b, s, 4)
    t_kv = collective_seconds("send", 2, kv, cp_link.bw, cp_link.latency)
    t_dkv = collective_seconds("send", 2, dkv, cp_link.bw, cp_link.latency)
    c = s / (2 * cp)
    block = 4 * b * 2 * c * c * model.hidden / tp / rate if overlap and rate else 0.0
    hops = cp - 1
    fwd = hops * max(0.0, t_kv - block)
    bwd = hops * max(0.0, t_kv + t_dkv - 2 * block) + t_dkv
    if recompute != "none":  # the attention's forward is replayed, its ring with it
        bwd += fwd
    sent = sum(nbytes for (_, op), (_, nbytes) in
               traffic.cp_traffic(model, cp, tp, b, s, 1, recompute, elem_bytes).items() if op.endswith("_send"))
    return Ring(fwd, bwd, sent)


def experts_cost(model: ModelConfig, ep: int, b: float, s: int, e: int, link: Link) -> Ring:
    """One block's all-to-alls per micro-batch of ``b`` sequences under expert parallelism,
    averaged over the blocks (a share of them hold experts): the exchanges of
    :func:`~paratrain.core.traffic.ep_comm_per_step`, dropless (a capacity factor keeps at most
    as many rows), over the ep group's ``link``. Forward: the expert counts, the rows dispatched
    and combined; backward: the two exchanges of their gradients. Nothing hides them: each expert
    waits for its rows, each token for its outputs. NO_RING without experts or at ep 1."""
    if ep == 1 or not model.num_experts:
        return NO_RING
    ops = traffic.ep_comm_per_step(model, ep, b, s, 1, elem_bytes=e)  # every MoE block of one micro-batch
    per_block = 1 / model.num_layers
    secs = {op: collective_seconds("all_to_all", ep, nbytes / calls, *link) * calls * per_block
            for op, (calls, nbytes) in ops.items()}
    forward = secs["ep_counts"] + secs["ep_dispatch"] + secs["ep_combine"]
    return Ring(forward, sum(secs.values()) - forward,
                sum(wire_bytes("all_to_all", ep, nbytes) for _, nbytes in ops.values()) * per_block)
