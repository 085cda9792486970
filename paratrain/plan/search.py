"""Layout search: every valid layout of N devices, estimated, filtered by memory, ranked by time.

Pure Python (no torch). The space is the layouts of N devices that :meth:`Layout.validate`
accepts (the one rule the runtime applies too), one of each set of equivalent ones:

    tp    divides N and <= devices per node (tensor-parallel collectives run every layer and
          need the fast link) unless allowed; validate: it divides the heads, hidden size and
          MLP width (a vocabulary it does not divide is padded: config.padded_vocab_size)
    pp    divides N / tp; validate: <= layers
    cp    divides N / (tp pp), cp tp <= devices per node (the ring passes keys and values every
          layer: like tp it needs the fast link) unless allowed; validate: 2 cp divides the
          sequence length (with sequence parallelism cp tp divides it too), no dropout
    dp    = N / (tp pp cp); validate: divides the global batch
    ep    a mixture of experts only: every divisor of dp that divides the experts (1 for a dense model)
    microbatches  every divisor of the local batch B / dp (validate: a multiple of pp when interleaved)
    zero  0-3; at dp = 1 only 0 (ZeRO shards over dp: with one replica every stage is zero 0's
          layout, which the runtime accepts and runs as such) unless pinned
    schedule      with pp > 1: 1f1b, and interleaved with every v >= 2, pp v <= layers (the
          partition need not be even: the runtime's cost-balanced one). GPipe is left out unless
          asked for (--schedule gpipe): it has 1F1B's bubble and holds all m micro-batches
          instead of p ([N21] sec. 2.2.1), so under this model it never beats 1F1B; interleaved
          with v = 1 runs 1F1B's order (only when pinned). With pp = 1 there is no schedule.
    recompute     none, selective, full
    sequence_parallel  off, and on when tp > 1 (validate: tp divides the sequence length)
    stage_layers, stage_speeds   the automatic partition unless pinned

Layouts are ranked by predicted step time, then by bytes moved, then by peak memory. ``fixed``
pins any Layout field (the CLI's layout flags), which also lets a user search one corner of the
space; a pinned value is always tried and kept if valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from paratrain.config import RECOMPUTE, Layout, valid_tp
from paratrain.errors import ConfigError
from paratrain.layout import check_experts  # the mixture of experts part of the one rule
from paratrain.models.configs import ModelConfig
from paratrain.plan.bound import variant
from paratrain.plan.cost import CostOptions, Estimate, _estimate, estimate
from paratrain.plan.hardware import GiB, Hardware
from paratrain.plan.hetero import SpeedPlan, with_speeds
from paratrain.plan.screen import Block, _with_zero, bounded, rank_key

MAX_LAYOUTS = 200_000  # a search of this many takes seconds; beyond, the user pins part of the layout


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, in O(sqrt n) steps (a batch of 10^9 has 100)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _shared_valid(layout: Layout, model: ModelConfig, global_batch: int, seq_len: int) -> bool:
    """``layout`` passes :meth:`Layout.check_shared`: the part of validate that every variant of it
    in recomputation and sequence parallelism shares."""
    try:
        layout.check_shared(model, global_batch, seq_len)
    except ConfigError:
        return False
    return True


def _variant_valid(layout: Layout, seq_len: int) -> bool:
    try:
        layout.check_variant(seq_len)
    except ConfigError:
        return False
    return True


def _schedules(pp: int, num_layers: int, fixed: dict[str, Any]) -> list[tuple[str, int]]:
    """(schedule, virtual stages) candidates for ``pp`` stages; a pinned value is always tried."""
    if pp == 1:  # no pipeline: the schedule does not matter, so a pinned one means pp > 1
        return [("1f1b", 1)] if fixed.get("schedule", "1f1b") == "1f1b" and fixed.get("virtual_stages", 1) == 1 \
            else []
    names = [fixed["schedule"]] if "schedule" in fixed else ["1f1b", "interleaved", "zb-h1", "zb-v"]
    out = []
    for name in names:
        if "virtual_stages" in fixed:
            out.append((name, fixed["virtual_stages"]))
        elif name == "zb-v":  # two chunks per rank, always
            out.append((name, 2))
        else:  # interleaved with v = 1 runs 1F1B's order: only when pinned
            out += [(name, v) for v in (range(2, num_layers // pp + 1) if name == "interleaved" else [1])]
    return out


def enumerate_layouts(model: ModelConfig, num_devices: int, global_batch: int, seq_len: int,
                      devices_per_node: int, fixed: dict[str, Any] | None = None,
                      allow_cross_node_tp: bool = False) -> Iterator[Layout]:
    """Every layout of the space described in the module docstring, honouring ``fixed``: the
    candidates are built, and those :meth:`Layout.validate` accepts are kept (the one rule).

    Validity never depends on the ZeRO stage beyond its range, so one candidate per combination
    of the other fields is validated and its ZeRO variants share the verdict (a test checks this
    against validating each one); its variants in recomputation and sequence parallelism share
    :meth:`Layout.check_shared`'s, and each is checked by :meth:`Layout.check_variant`."""
    for valid, zeros in _blocks(model, num_devices, global_batch, seq_len, devices_per_node, fixed,
                                allow_cross_node_tp):
        for zero in zeros:
            for candidate in valid:
                yield candidate if zero == zeros[0] else _with_zero(candidate, zero)


def _blocks(model: ModelConfig, num_devices: int, global_batch: int, seq_len: int, devices_per_node: int,
            fixed: dict[str, Any] | None, allow_cross_node_tp: bool) -> Iterator[Block]:
    """:func:`enumerate_layouts` by blocks: per (dp, pp, tp, cp, micro-batches, schedule) the valid
    candidates (by recomputation, then sequence parallelism) at the first ZeRO stage of the block's
    stages, each of which gives one layout per stage."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(Layout.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown layout field(s) {sorted(unknown)}; valid: {list(Layout.__dataclass_fields__)}.")

    def pick(name: str, values: Iterable[Any]) -> list[Any]:
        return [fixed[name]] if name in fixed else list(values)

    recomputes = pick("recompute", RECOMPUTE)
    stage_layers, stage_speeds = fixed.get("stage_layers"), fixed.get("stage_speeds")
    for tp in pick("tp", [t for t in divisors(num_devices) if allow_cross_node_tp or t <= devices_per_node]):
        if not isinstance(tp, int) or tp < 1 or num_devices % tp:
            continue
        pps = [x for x in pick("pp", divisors(num_devices // tp)) if isinstance(x, int) and x >= 1]
        for pp, cp in ((x, c) for x in pps if num_devices % (tp * x) == 0
                       for c in pick("cp", [c for c in divisors(num_devices // (tp * x))
                                            if allow_cross_node_tp or c * tp <= devices_per_node])):
            if not isinstance(cp, int) or cp < 1 or num_devices % (tp * pp * cp):
                continue
            dp = num_devices // (tp * pp * cp)
            if fixed.get("dp", dp) != dp or global_batch % dp:
                continue
            zeros = pick("zero", [0, 1, 2, 3] if dp > 1 else [0])  # zero > 0 at dp = 1 equals zero 0
            schedules = _schedules(pp, model.num_layers, fixed)
            sps = pick("sequence_parallel", [False, True] if tp > 1 else [False])
            eps = pick("ep", [e for e in divisors(dp) if model.num_experts % e == 0] if model.num_experts else [1])
            for ep, m in ((e, m) for e in eps for m in pick("microbatches", divisors(global_batch // dp))):
                for schedule, v in schedules:
                    shared = dict(dp=dp, pp=pp, tp=tp, cp=cp, microbatches=m, schedule=schedule, virtual_stages=v,
                                  stage_layers=stage_layers, stage_speeds=stage_speeds, ep=ep)
                    one = Layout(**shared, zero=zeros[0], recompute=recomputes[0], sequence_parallel=sps[0])
                    if not _shared_valid(one, model, global_batch, seq_len):  # validate's common part, once
                        continue
                    valid = tuple(c for r in recomputes for sp in sps
                                  if _variant_valid(c := variant(one, recompute=r, sequence_parallel=sp), seq_len))
                    if valid:
                        yield valid, tuple(zeros)


@dataclass(frozen=True)
class PlanResult:
    """The ranked layouts that fit (best first) and what the search saw."""

    ranked: tuple[Estimate, ...]  # every layout that fits, or the ``top`` fastest (search's argument)
    considered: int
    smallest_unfit: Estimate | None  # the least memory-hungry layout that does not fit
    best_pure_dp: Estimate | None  # the fastest fitting layout with pp = tp = 1 (or least memory)
    best_speed_plan: SpeedPlan | None = None  # with device speeds: the winner's speed-aware split
    num_fitting: int | None = None  # layouts that fit (None: len(ranked), every one ranked)

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    @property
    def fitting(self) -> int:
        """How many of the layouts considered fit."""
        return len(self.ranked) if self.num_fitting is None else self.num_fitting

    def explain(self) -> str:
        """One or two sentences: why the best layout wins."""
        return explain(self)


def search(model: ModelConfig, num_devices: int, hardware: Hardware, global_batch: int, seq_len: int,
           precision: str = "bf16", options: CostOptions | None = None,
           fixed: dict[str, Any] | None = None, allow_cross_node_tp: bool = False,
           device_speeds: tuple[float, ...] | None = None,
           keep: Callable[[Layout], bool] | None = None, top: int = 0) -> PlanResult:
    """Estimate every layout, keep those that fit, rank by (step time, bytes moved, peak memory).

    ``device_speeds`` (one per device): each layout is priced with stages and batch shares sized to
    speed (:func:`paratrain.plan.hetero.with_speeds`; its slowest replica). ``keep``: only layouts
    it accepts (e.g. what the training runtime implements). ``top`` > 0: rank only the ``top``
    fastest (at least 2: the explanation compares the winner with the next), found by branch and
    bound (:func:`paratrain.plan.screen.bounded`): the same ones, in the same order, as ranking every layout (tested),
    and the same count of fitting layouts, the least memory-hungry misfit and the best pure
    data-parallel layout."""
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ConfigError(f"the number of devices must be a positive integer, got {num_devices!r}.")
    options = options or CostOptions()
    # Validates precision, options, batch and sequence length once, on the simplest layout.
    estimate(model, Layout(dp=1), hardware, global_batch, seq_len, precision, options)
    blocks: list[Block] = []
    considered = rejected = 0
    for valid, zeros in _blocks(model, num_devices, global_batch, seq_len, hardware.devices_per_node, fixed,
                                allow_cross_node_tp):
        if keep is None:
            blocks.append((valid, zeros))
            considered += len(valid) * len(zeros)
        else:  # per ZeRO stage, the block's candidates kept (the enumeration's order)
            for zero in zeros:
                at = valid if zero == zeros[0] else tuple(_with_zero(c, zero) for c in valid)
                kept = tuple(c for c in at if keep(c))
                if kept:
                    blocks.append((kept, (zero,)))
                considered += len(kept)
                rejected += len(at) - len(kept)
        if considered > MAX_LAYOUTS:
            raise ConfigError(f"more than {MAX_LAYOUTS:,} layouts of {num_devices} devices to search for model "
                              f"{model.name!r} with global batch {global_batch} (every divisor of the local batch "
                              f"is a micro-batch count): pin part of the layout (e.g. --microbatches, --pp, "
                              f"--tp), or use a global batch with fewer divisors.")
    if not considered and rejected:
        raise ConfigError(f"none of the {rejected} valid layouts of {num_devices} devices with the constraints "
                          f"{_flags(fixed)} is one the training runtime implements (a mixture of experts "
                          f"with some of them, for one, is not); drop the constraint that asks for it.")
    if not considered and (fixed or {}).get("ep", 1) > 1:
        check_experts(Layout(dp=fixed["ep"], ep=fixed["ep"]), model)  # the experts' own reason, if any
    if not considered:
        raise ConfigError(f"no valid layout of {num_devices} devices for model {model.name!r} with global "
                          f"batch {global_batch} and the given constraints {_flags(fixed)}: dp must divide the "
                          f"batch, tp must divide the heads (valid tp: {valid_tp(model)}), pp <= "
                          f"{model.num_layers} layers, pp x virtual_stages <= {model.num_layers}, micro-batches "
                          f"divide the local batch (a multiple of pp when interleaved).")
    if top and device_speeds is None:
        found = bounded(blocks, model, hardware, global_batch, seq_len, precision, options, max(top, 2))
        return PlanResult(found.ranked, considered, found.smallest_unfit, found.best_pure_dp,
                          num_fitting=found.num_fitting)
    layouts = [c if zero == zeros[0] else _with_zero(c, zero)
               for valid, zeros in blocks for zero in zeros for c in valid]
    return _exhaustive(layouts, (model, hardware, global_batch, seq_len, precision, options), device_speeds)


def _flags(fixed: dict[str, Any] | None) -> str:
    """The pinned layout fields as the flags that pin them: ``--tp 2 --stage-layers 3,3``."""
    def text(value: Any) -> str:
        return ",".join(f"{x:g}" for x in value) if isinstance(value, tuple) else str(value)

    return " ".join(f"--{k.replace('_', '-')} {text(v)}" for k, v in (fixed or {}).items()) or "(none)"


_Args = tuple[ModelConfig, Hardware, int, int, str, CostOptions]


def _exhaustive(layouts: list[Layout], args: _Args, device_speeds: tuple[float, ...] | None) -> PlanResult:
    """Price every layout in full; rank every one that fits."""
    model, hardware, global_batch, seq_len, precision, options = args
    fits: list[Estimate] = []
    smallest: Estimate | None = None
    pure_fit: Estimate | None = None
    pure_unfit: Estimate | None = None
    plans: dict[Layout, SpeedPlan] = {}
    for layout in layouts:
        if device_speeds is None:
            est = _estimate(model, layout, hardware, global_batch, seq_len, precision, options)
        else:
            plan = with_speeds(model, layout, hardware, global_batch, seq_len, precision, options, device_speeds)
            est = plans.setdefault(plan.slowest.layout, plan).slowest
        pure = layout.tp == 1 and layout.pp == 1
        if est.fits:
            fits.append(est)
            if pure and (pure_fit is None or _key(est) < _key(pure_fit)):
                pure_fit = est
        else:
            if smallest is None or est.peak_bytes_per_device < smallest.peak_bytes_per_device:
                smallest = est
            if pure and (pure_unfit is None or est.peak_bytes_per_device < pure_unfit.peak_bytes_per_device):
                pure_unfit = est
    fits.sort(key=_key)
    best_plan = plans.get(fits[0].layout) if fits and plans else None
    return PlanResult(tuple(fits), len(layouts), smallest, pure_fit or pure_unfit, best_plan)


_key = rank_key


_PARTS = {"compute": "compute (recomputation included)", "tp_comm": "tensor-parallel communication",
          "pp_comm": "pipeline sends", "bubble": "pipeline bubble", "dp_comm": "exposed data-parallel communication",
          "optimizer": "optimizer step", "cp_comm": "exposed ring-attention transfers",
          "ep_comm": "expert-parallel all-to-alls"}


def _why_slower(best: Estimate, other: Estimate) -> str:
    """The step-time component where ``other`` loses the most to ``best``."""
    diffs = {k: getattr(other.time, k) - getattr(best.time, k) for k in _PARTS}
    part = max(diffs, key=lambda k: diffs[k])
    return f"+{_s(diffs[part])} of {_PARTS[part]}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 else f"{x * 100:.2g}%"


def _mem(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def explain(result: PlanResult) -> str:
    """Why the best layout wins, against the runner-up and the best pure data-parallel layout."""
    if not result.ranked:
        return "no layout fits."
    best = result.best
    text = [f"[{best.layout}] wins at {_s(best.step_time_s)} per step (MFU {best.mfu:.1%})."]
    runner = next((e for e in result.ranked[1:] if e.step_time_s > best.step_time_s), None)
    if len(result.ranked) > 1 and result.ranked[1].step_time_s == best.step_time_s:
        twin = result.ranked[1]  # ranked by bytes moved, then memory (screen.rank_key)
        moved = [rank_key(e)[1] for e in (twin, best)]
        if moved[0] > moved[1]:
            why = f"moves more bytes per step ({_mem(moved[0])} vs {_mem(moved[1])} per device)"
        else:
            why = f"needs more memory ({_mem(twin.peak_bytes_per_device)} vs {_mem(best.peak_bytes_per_device)})"
        text.append(f"[{twin.layout}] is as fast but {why}.")
    elif runner is not None:
        gain = runner.step_time_s / best.step_time_s - 1
        text.append(f"The runner-up [{runner.layout}] is {_pct(gain)} slower ({_why_slower(best, runner)}).")
    pure = result.best_pure_dp
    if best.layout.tp == 1 and best.layout.pp == 1 and best.layout.cp == 1:
        shard = f" (ZeRO-{best.layout.zero} shards the model states over dp)" if best.layout.zero else ""
        experts = f", with the experts sharded over ep={best.layout.ep}" if best.layout.ep > 1 else ""
        text.append(f"No tensor or pipeline split is needed: data parallelism alone fits{shard}{experts}.")
    elif pure is None:
        text.append("No pure data-parallel layout exists for this batch (dp would not divide it).")
    elif not pure.fits:
        text.append(f"Pure data parallelism cannot work: even [{pure.layout}] needs "
                    f"{_mem(pure.peak_bytes_per_device)} per device of {_mem(pure.capacity_bytes)}.")
    else:
        text.append(f"The best pure data-parallel layout [{pure.layout}] is "
                    f"{pure.step_time_s / best.step_time_s:.2f}x slower ({_why_slower(best, pure)}).")
    return " ".join(text)
