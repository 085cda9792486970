"""The pipeline's idle time and its activation stash, in closed form. Pure Python (no torch).

The runtime reports :func:`bubble_fraction` next to the measured timeline, ``paratrain
schedule`` prints it next to the simulated one, and the planner prices the pipeline with it;
:func:`in_flight_microbatches` is the stash the schedules of :mod:`.schedules` keep (the checker
proves they never exceed it). Symbols: ``p`` pipeline stages (ranks), ``m`` micro-batches,
``v`` virtual stages (model chunks) per rank.

References:
  [H19] Huang et al., "GPipe", NeurIPS 2019 (arXiv:1811.06965).
  [N21] Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
        Megatron-LM", SC21 (arXiv:2104.04473).
  [Q24] Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024 (arXiv:2401.10241).
  [K22] Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
        MLSys 2023 (arXiv:2205.05198).
"""

from __future__ import annotations


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of the whole step of a pipeline with equal stages (the bubble over the total
    time, not over the ideal time):

        GPipe, 1F1B:   (p - 1) / (m + p - 1)      ([H19]; [N21] sec. 2.2.1: the same bubble)
        interleaved:   (p - 1) / (v m + p - 1)    ([N21] sec. 2.2.2: bubble time / v)

    zero-bubble schedules (the backward split into I and W, each costing a forward), from
    their critical paths in ticks of one F (of a chunk for ZB-V):

        zb-h1:   1 - 3m / max(3m + p - 1, 2m + 2p - 1)    ([Q24] sec. 2.1: bubble time
                 (p - 1)(T_F + T_B - T_W), a third of 1F1B's (p - 1)(T_F + T_B + T_W), m >= p)
        zb-v:    1 - 6m / max(6m + p - 1, 4p + 2m - 1)    ([Q24] sec. 6: two chunks in a V, "zero"
                 but for the p - 1 chunk forwards the first micro-batch needs to reach the last
                 rank, which only an optimizer step that does not synchronise can hide)

    (for m >= p the first terms win: (p - 1)/(3m + p - 1) and (p - 1)/(6m + p - 1)).
    [N21] writes the bubble relative to the ideal time, (p - 1)/m and (p - 1)/(v m); the
    fractions above are the same bubble divided by ideal + bubble. 0 when p = 1."""
    if p <= 1:
        return 0.0
    if schedule == "zb-h1":
        return 1 - 3 * m / max(3 * m + p - 1, 2 * m + 2 * p - 1)
    if schedule == "zb-v":
        return 1 - 6 * m / max(6 * m + p - 1, 4 * p + 2 * m - 1)
    vv = v if schedule == "interleaved" else 1
    return (p - 1) / (vv * m + p - 1)


def fill_share(schedule: str) -> float:
    """The share of a stage's (chunk's) forward + backward that one fill or drain step of the
    pipeline idles: 1 for GPipe and the 1F1Bs; a third for the zero-bubble schedules, whose
    idle step is T_F + T_I - T_W of T_F + T_I + T_W ([Q24] sec. 2.1), one forward when the
    three are equal (a backward costs two forwards). The planner prices the bubble of stages of
    unequal cost with it: ``(sum_i t_i - t_max) / v * fill_share``."""
    return 1 / 3 if schedule in ("zb-h1", "zb-v") else 1.0


def in_flight_microbatches(schedule: str, p: int, m: int, v: int, stage: int) -> float:
    """How many micro-batches' activations of its layers pipeline stage ``stage`` (0-based) holds
    at its peak, in units of "one micro-batch through all of this device's layers".

    p = 1 (no pipeline; micro-batches are gradient accumulation): 1.
    GPipe: every micro-batch's forward runs before any backward: m ([H19]).
    1F1B: stage i runs p - i warm-up forwards before its first backward: min(p - i, m) ([N21]
    sec. 2.2.1); the first stage holds p.
    Interleaved with v chunks per device: Megatron's warm-up is 2(p - i - 1) + (v - 1) p chunk
    forwards, +1 in the steady state, each of 1/v of the device's layers: min(m v, 2(p - i - 1) +
    (v - 1) p + 1) / v. For i = 0 this is p (1 + (p - 1)/(p v)), the factor of [K22] sec. 4.2.2.
    ZB-H1 (from F to W: a W needs what its I kept): min(p, m) on every stage, of which
    min(p - i, m) whole and the rest only what W needs ([Q24] sec. 2.1; :func:`deferred_w`).
    ZB-V: 2 min(p, m) chunks of 1/2 of the device's layers: min(p, m) ([Q24] sec. 6).
    """
    if p == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule in ("zb-h1", "zb-v"):
        return float(min(p, m))
    if schedule == "interleaved" and v > 1:
        return min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1) / v
    return float(min(p - stage, m))


def deferred_w(schedule: str, p: int, m: int, stage: int) -> float:
    """Of :func:`in_flight_microbatches` of a ZB-H1 stage, how many are past their I at the peak
    and hold only what their W needs (each linear's input and output gradient): ``min(p, m) -
    min(p - i, m)``. 0 for the other schedules (ZB-V: counted from its schedule by the planner)."""
    if schedule != "zb-h1" or p == 1:
        return 0.0
    return float(min(p, m) - min(p - stage, m))
