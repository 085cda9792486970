"""search(): the layout space, filtering by memory, ranking, the explanation, and speed."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from paratrain.config import RECOMPUTE, SCHEDULES, Layout
from paratrain.errors import ConfigError
from paratrain.models.configs import ModelConfig, get_model_config
from paratrain.plan.cost import estimate
from paratrain.plan.hardware import get_hardware
from paratrain.plan.search import enumerate_layouts, search

MODEL = ModelConfig("m", num_layers=24, hidden=2048, num_heads=16, vocab_size=51200, max_seq_len=2048)
H100 = get_hardware("H100-80GB")


def test_every_enumerated_layout_is_valid_and_distinct() -> None:
    layouts = list(enumerate_layouts(MODEL, 16, 64, 2048, devices_per_node=8))
    assert len(layouts) == len(set(layouts)) > 1000
    for layout in layouts:
        layout.validate(MODEL, 64, 2048)
        assert layout.world_size == 16 and layout.tp <= 8
    seen = {(lay.dp, lay.pp, lay.tp) for lay in layouts}
    assert (16, 1, 1) in seen and (2, 1, 8) in seen and (1, 16, 1) in seen
    assert not any(lay.schedule == "gpipe" for lay in layouts)  # dominated by 1F1B (module docstring)
    assert all(lay.zero == 0 for lay in layouts if lay.dp == 1)  # the same layout as zero 1-3 there


SMALL = ModelConfig("s", num_layers=6, hidden=48, num_heads=6, vocab_size=100, max_seq_len=64)


def _every_valid_layout(model: ModelConfig, n: int, batch: int, seq_len: int) -> set[Layout]:
    """Brute force: every combination of the Layout fields with dp pp cp tp = n that validate()
    accepts (the automatic partition: no stage_layers / stage_speeds)."""
    out = set()
    for dp, pp, tp, cp in itertools.product(range(1, n + 1), repeat=4):
        if dp * pp * tp * cp != n:
            continue
        for zero, m, schedule, v, sp, recompute in itertools.product(
                range(4), range(1, batch + 1), SCHEDULES, range(1, model.num_layers + 1), (False, True), RECOMPUTE):
            layout = Layout(dp=dp, pp=pp, tp=tp, cp=cp, zero=zero, microbatches=m, schedule=schedule,
                            virtual_stages=v, sequence_parallel=sp, recompute=recompute)
            try:
                layout.validate(model, batch, seq_len)
            except ConfigError:
                continue
            out.add(layout)
    return out


def _canonical(layout: Layout, devices_per_node: int) -> Layout | None:
    """The searched layout equivalent to ``layout`` (None: left out of the space unless pinned)."""
    if layout.tp * layout.cp > devices_per_node or (layout.schedule == "gpipe" and layout.pp > 1):
        return None  # tp (or cp x tp) beyond a node; GPipe, dominated by 1F1B
    if layout.pp == 1 or (layout.schedule == "interleaved" and layout.virtual_stages == 1):
        layout = dataclasses.replace(layout, schedule="1f1b", virtual_stages=1)  # no pipeline / 1F1B's order
    return dataclasses.replace(layout, zero=0) if layout.dp == 1 else layout  # nothing to shard over


@pytest.mark.parametrize("n,batch,seq_len,per_node", [(4, 8, 64, 8), (6, 12, 30, 2), (8, 4, 64, 4)])
def test_the_space_is_every_valid_layout(n: int, batch: int, seq_len: int, per_node: int) -> None:
    """One rule: the search enumerates exactly the layouts Layout.validate accepts, one of each
    equivalent set (the module docstring): interleaved with uneven chunks and ZeRO pinned at
    dp = 1 included, nothing the validation refuses."""
    space = list(enumerate_layouts(SMALL, n, batch, seq_len, per_node))
    assert len(space) == len(set(space))
    for layout in space:
        layout.validate(SMALL, batch, seq_len)  # every candidate on its own, not by its group's verdict
    brute = {c for c in (_canonical(x, per_node) for x in _every_valid_layout(SMALL, n, batch, seq_len)) if c}
    assert set(space) == brute
    assert any(x.schedule == "interleaved" and SMALL.num_layers % (x.pp * x.virtual_stages) for x in space)
    pinned = set(enumerate_layouts(SMALL, n, batch, seq_len, per_node, fixed={"zero": 2, "dp": 1}))
    assert pinned and all(x.zero == 2 and x.dp == 1 for x in pinned)
    for x in pinned:
        x.validate(SMALL, batch, seq_len)


def test_fixed_fields_pin_the_space() -> None:
    layouts = list(enumerate_layouts(MODEL, 16, 64, 2048, 8, fixed={"tp": 2, "recompute": "none", "schedule": "gpipe"}))
    assert layouts and all(lay.tp == 2 and lay.recompute == "none" and lay.schedule == "gpipe" for lay in layouts)
    assert list(enumerate_layouts(MODEL, 16, 64, 2048, 8, fixed={"tp": 3})) == []
    with pytest.raises(ConfigError, match="unknown layout field"):
        list(enumerate_layouts(MODEL, 16, 64, 2048, 8, fixed={"tensor": 2}))
    cross = list(enumerate_layouts(MODEL, 16, 64, 2048, 8, allow_cross_node_tp=True))
    assert any(lay.tp == 16 for lay in cross)


def test_ranking_and_filtering() -> None:
    result = search(MODEL, 16, H100, 256, 2048)
    keys = [(e.step_time_s, e.comm_bytes_per_device.dp + e.comm_bytes_per_device.tp + e.comm_bytes_per_device.pp,
             e.peak_bytes_per_device) for e in result.ranked]
    assert keys == sorted(keys)
    assert all(e.fits for e in result.ranked)
    assert result.considered > len(result.ranked)
    # The winner is what estimate() says for the same layout.
    best = result.best
    again = estimate(MODEL, best.layout, H100, 256, 2048)
    assert again.step_time_s == best.step_time_s and again.peak_bytes_per_device == best.peak_bytes_per_device


def test_memory_pressure_forces_model_parallelism() -> None:
    """A 13B model cannot be trained by plain data parallelism on 16 GiB devices: the winner must
    shard (ZeRO, tp or pp) and the explanation must say why pure DP loses."""
    model = ModelConfig("m13", num_layers=40, hidden=5120, num_heads=40, vocab_size=51200, max_seq_len=2048)
    hw = H100.replace(memory_bytes=16 * 2**30)
    result = search(model, 64, hw, 128, 2048)
    best = result.best.layout
    assert best.tp > 1 or best.pp > 1 or best.zero == 3
    assert result.best.peak_bytes_per_device <= result.best.capacity_bytes
    text = result.explain()
    assert str(best) in text and ("runner-up" in text or "as fast" in text)
    assert "data-parallel" in text or "data parallelism" in text


def test_explanation_compares_with_runner_up() -> None:
    result = search(get_model_config("gpt2-350m"), 8, H100, 64, 1024)
    text = result.explain()
    assert text.startswith(f"[{result.best.layout}] wins")


def test_nothing_fits() -> None:
    result = search(get_model_config("gpt-175b"), 8, H100, 8, 2048)
    assert result.ranked == () and result.smallest_unfit is not None
    assert not result.smallest_unfit.fits


def test_invalid_inputs() -> None:
    with pytest.raises(ConfigError):
        search(MODEL, 0, H100, 8, 2048)
    with pytest.raises(ConfigError, match="no valid layout"):
        search(MODEL, 16, H100, 64, 2048, fixed={"dp": 3})
    with pytest.raises(ConfigError, match="seq_len"):
        search(MODEL, 8, H100, 8, 4096)


def test_search_covers_thousands_of_layouts() -> None:
    """A 512-device search enumerates and costs >10k layouts (its speed is measured by
    benchmarks/planner_speed.py, not asserted here: the test machine is shared)."""
    model = ModelConfig("m39", num_layers=48, hidden=8192, num_heads=64, vocab_size=51200, max_seq_len=2048)
    # cp pinned to 1: the cp axis multiplies this space by 2.6 (62,160 layouts instead of 23,952)
    # and this test's time with it; tests/unit/test_plan_context.py searches cp
    result = search(model, 512, get_hardware("A100-80GB"), 1536, 2048, fixed={"cp": 1})
    assert result.considered > 10_000
    assert result.ranked and all(e.fits for e in result.ranked)


def test_equal_step_times_prefer_less_traffic() -> None:
    """At the same predicted step time the layout that moves fewer bytes ranks first, even if
    another uses less memory (ZeRO-3 gathers the parameters twice more than ZeRO-1), and among
    equal bytes the one using less memory."""
    import dataclasses

    from paratrain.config import Layout
    from paratrain.plan.search import _key

    z1, z2, z3 = (estimate(MODEL, Layout(dp=8, zero=z), H100, 64, 2048) for z in (1, 2, 3))
    z2, z3 = (dataclasses.replace(e, time=z1.time) for e in (z2, z3))  # the premise: a tie
    assert z3.peak_bytes_per_device < z2.peak_bytes_per_device < z1.peak_bytes_per_device
    assert z3.comm_bytes_per_device.dp > z1.comm_bytes_per_device.dp == z2.comm_bytes_per_device.dp
    assert [e.layout.zero for e in sorted([z3, z1, z2], key=_key)] == [2, 1, 3]


def test_plan_auto_names_one_winner():
    """--plan auto simulates the estimate's shortlist and may choose another layout than the
    estimate's first: the explanation then says the estimate's first would win by the estimate
    alone, and names the chosen layout first, as what the simulation gives, never two "winners"."""
    from paratrain.config import TrainConfig
    from paratrain.plan.local import auto_layout, local_hardware

    hw, source = local_hardware(2, "/nonexistent-profile")
    auto = auto_layout(TrainConfig(), 2, hw, source)
    assert auto.explanation.count(" wins at") == 1
    first = auto.explanation.split(" wins at")[0]
    assert first.endswith(f"[{auto.layout}]") or (
        auto.explanation.startswith(f"Chosen [{auto.layout}]: simulated") and first.endswith("]")
        and "By the estimate alone [" in first)


class _Blind:
    """A layout whose recomputation and sequence parallelism cannot be read."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout

    def __getattr__(self, name: str):
        if name in ("recompute", "sequence_parallel"):
            raise AssertionError(f"check_shared read {name}")
        value = getattr(self._layout, name)
        return value.__get__(self) if hasattr(value, "__func__") else value


@pytest.mark.parametrize("fields", [
    dict(dp=2, tp=2, pp=2, microbatches=4, schedule="interleaved", virtual_stages=2),
    dict(tp=2, cp=2, dp=2, microbatches=2), dict(pp=3, schedule="zb-v", microbatches=6),
    dict(dp=3, microbatches=5), dict(tp=5, pp=7), dict(pp=2, stage_layers=(1, 5), schedule="zb-h1"),
])
def test_the_search_checks_once_what_variants_share(fields: dict) -> None:
    """search._blocks checks Layout.check_shared once per candidate and check_variant per variant
    in recomputation and sequence parallelism: that is validate only if check_shared never reads
    those two fields (run on valid and invalid layouts: a read fails the test either way), and
    validate is exactly the two."""
    for recompute, sp in itertools.product(RECOMPUTE, (False, True)):
        layout = Layout(**fields, recompute=recompute, sequence_parallel=sp)
        try:
            Layout.check_shared(_Blind(layout), SMALL, 12, 60)
            shared = None
        except ConfigError as e:
            shared = str(e)
        try:
            layout.check_variant(60)
            variant = None
        except ConfigError as e:
            variant = str(e)
        try:
            layout.validate(SMALL, 12, 60)
            whole = None
        except ConfigError as e:
            whole = str(e)
        assert whole == (shared or variant)
