"""Human-readable output of the planner: the breakdown of one estimate, the table of a search.

Pure formatting (no torch); the JSON forms are :meth:`Estimate.to_dict` and :func:`plan_json`.
"""

from __future__ import annotations

from typing import Any

from paratrain.core.bubble import in_flight_microbatches
from paratrain.plan import formulas as f
from paratrain.plan.cost import Estimate
from paratrain.plan.hardware import GiB, Hardware
from paratrain.plan.hetero import speed_report
from paratrain.plan.search import PlanResult
from paratrain.text import format_grid


def fmt_bytes(x: float) -> str:
    """Binary units, as GPU memory is quoted: 1 GiB = 2^30 bytes."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def fmt_seconds(x: float) -> str:
    if x == 0:
        return "0"
    if x < 1e-3:
        return f"{x * 1e6:.1f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.3f} s"


def fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.0f} FLOP"


def _header(e: Estimate, hw: Hardware) -> str:
    prec = {"bf16": "bf16 mixed precision" + (" (fp32 gradients)" if e.grad_bytes == 4 else ""),
            "bf16-autocast": "bf16 autocast over fp32 weights"}.get(e.precision, "fp32")
    if e.host_bytes_per_device:
        prec += ", optimizer offloaded to host memory"
    return (f"{e.model}: {e.params:,} parameters on {e.num_devices} x {hw.name}\n"
            f"layout [{e.layout}], global batch {e.global_batch} x {e.seq_len} tokens, {prec}")


def estimate_report(e: Estimate, hw: Hardware) -> str:
    """The breakdown printed by ``paratrain estimate``."""
    P, _, K = f.STATE_BYTES[e.precision]
    G = e.grad_bytes
    flight = in_flight_microbatches(e.layout.schedule, e.layout.pp, e.layout.microbatches,
                                    e.layout.virtual_stages, e.most_loaded_stage)
    L = e.layout
    over = f"dp x cp = {L.dp * L.cp}" if L.cp > 1 else f"dp={L.dp}"
    over += f"; experts over dp / ep = {L.dp // L.ep}" if L.ep > 1 else ""
    zero = f", ZeRO-{L.zero} over {over}" if L.zero else ""
    mem_rows = [
        [f"parameters ({P} B/param{zero if e.layout.zero >= 3 else ''})", fmt_bytes(e.state.params)],
        [f"gradients ({G} B/param{zero if e.layout.zero >= 2 else ''})", fmt_bytes(e.state.grads)],
        [f"optimizer state ({K} B/param{zero if e.layout.zero >= 1 else ''}"
         f"{', in host memory' if e.host_bytes_per_device else ''})", fmt_bytes(e.state.optimizer)],
    ]
    if e.host_bytes_per_device:
        mem_rows.append(["host memory: offloaded optimizer state (not on the device)",
                         fmt_bytes(e.host_bytes_per_device)])
    if e.buffer_bytes:
        mem_rows.append(["ZeRO-3 gather buffers", fmt_bytes(e.buffer_bytes)])
    mem_rows += [
        [f"activations ({flight:g} micro-batch(es) in flight, recompute {e.layout.recompute})",
         fmt_bytes(e.activation_bytes_per_device)],
        ["peak", fmt_bytes(e.peak_bytes_per_device)],
        ["usable capacity", f"{fmt_bytes(e.capacity_bytes)} of {fmt_bytes(hw.memory_bytes)}"],
    ]
    t = e.time
    parts = [("compute", t.compute), ("tensor-parallel communication", t.tp_comm),
             ("pipeline sends", t.pp_comm), ("pipeline bubble", t.bubble),
             ("exposed data-parallel communication", t.dp_comm), ("optimizer step", t.optimizer)]
    if e.layout.cp > 1:
        parts.insert(2, ("exposed ring-attention transfers (cp)", t.cp_comm))
    if e.layout.ep > 1:
        parts.insert(2, ("expert-parallel all-to-alls (ep)", t.ep_comm))
    time_rows = [[name, fmt_seconds(sec), f"{sec / t.total:.1%}"] for name, sec in parts]
    time_rows.append(["step", fmt_seconds(t.total), "100%"])
    verdict = "fits" if e.fits else (f"DOES NOT FIT: needs {fmt_bytes(e.peak_bytes_per_device - e.capacity_bytes)} "
                                     f"more per device")
    lines = [
        _header(e, hw), "",
        format_grid([f"memory per device (stage {e.most_loaded_stage}, the most loaded)", "bytes"], mem_rows),
        f"-> {verdict}", "",
        format_grid(["FLOPs per step", ""], [
            ["model (forward + backward)", fmt_flops(e.flops_per_step)],
            [f"hardware (with recompute {e.layout.recompute})", fmt_flops(e.hardware_flops_per_step)],
            ["6 x params x tokens (cross-check)", fmt_flops(e.six_p_tokens_flops)],
        ]), "",
        format_grid(["step time (slowest pipeline stage)", "time", "share"], time_rows), "",
        f"throughput {e.tokens_per_s:,.0f} tokens/s   MFU {e.mfu:.1%}   HFU {e.hfu:.1%}   "
        f"bubble fraction {e.bubble_fraction:.1%}",
        "bytes sent per device per step: " + ", ".join(
            f"{axis} {fmt_bytes(v)}" for axis, v in e.comm_bytes_per_device.as_dict().items()),
        f"device: peak {fmt_flops(hw.peak_flops(e.precision))}/s ({e.precision}), compute assumed at "
        f"{e.efficiency:.0%} of peak; links {hw.intra_node_bw / 1e9:g} GB/s intra-node, "
        f"{hw.inter_node_bw / 1e9:g} GB/s inter-node, {hw.devices_per_node} devices per node",
    ] + [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def plan_report(result: PlanResult, hw: Hardware, seconds: float, top: int) -> str:
    """The table printed by ``paratrain plan``."""
    best = result.best
    rows = []
    for k, e in enumerate(result.ranked[:top] if top else result.ranked, 1):
        rows.append([f"{k:>2}. {e.layout}", f"{e.peak_bytes_per_device / GiB:.1f} / {e.capacity_bytes / GiB:.1f}",
                     fmt_seconds(e.step_time_s), f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}",
                     f"{e.bubble_fraction:.1%}"])
    lines = [
        _header(best, hw).split("\n")[0],
        f"searched {result.considered:,} layouts in {seconds:.2f} s: {result.fitting:,} fit in "
        f"{fmt_bytes(best.capacity_bytes)} usable per device", "",
        format_grid(["    layout", "memory GiB / usable", "step time", "tokens/s", "MFU", "bubble"], rows), "",
        "why: " + result.explain(),
    ] + ([speed_report(result.best_speed_plan)] if result.best_speed_plan else []) \
        + [f"note: {n}" for n in best.notes]
    return "\n".join(lines)


def plan_json(result: PlanResult, hw: Hardware, top: int) -> dict[str, Any]:
    """The JSON of ``paratrain plan --json``: the ranked list (the ``top`` best, all if 0)."""
    ranked = result.ranked[:top] if top else result.ranked
    return {
        "model": result.best.model, "num_devices": result.best.num_devices, "hardware": hw.to_dict(),
        "global_batch": result.best.global_batch, "seq_len": result.best.seq_len,
        "precision": result.best.precision, "considered": result.considered, "fitting": result.fitting,
        "explanation": result.explain(), "notes": list(result.best.notes), "ranked": [e.to_dict() for e in ranked],
        "device_speeds": result.best_speed_plan.to_dict() if result.best_speed_plan else None,
    }
