"""The torch-free core's closed forms: the pipeline bubble and stash (core.bubble), the ring
collectives (core.ring) and the data-parallel traffic, per bucket and per parameter (core.traffic)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paratrain.core.bubble import bubble_fraction, in_flight_microbatches
from paratrain.core.ring import ring_steps, wire_bytes
from paratrain.core.traffic import dp_parts, zero_comm_per_step


def test_bubble_fractions() -> None:
    assert bubble_fraction("1f1b", 1, 8) == 0
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved", 4, 8, 2) == pytest.approx(3 / 19)
    # [N21] quotes the bubble relative to the ideal time: (p-1)/m and (p-1)/(vm).
    frac = bubble_fraction("interleaved", 8, 16, 4)
    assert frac / (1 - frac) == pytest.approx(7 / (4 * 16))


def test_in_flight_counts() -> None:
    assert [in_flight_microbatches("1f1b", 4, 8, 1, i) for i in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches("1f1b", 4, 2, 1, i) for i in range(4)] == [2, 2, 2, 1]
    assert in_flight_microbatches("gpipe", 4, 8, 1, 3) == 8
    assert in_flight_microbatches("1f1b", 1, 8, 1, 0) == 1
    p, v = 8, 4  # [K22] sec. 4.2.2: the first stage holds p (1 + (p - 1)/(p v)) micro-batches' worth
    assert in_flight_microbatches("interleaved", p, 64, v, 0) == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_ring_wire_bytes_and_steps() -> None:
    S = 1000.0
    assert wire_bytes("all_reduce", 1, S) == 0
    assert wire_bytes("all_reduce", 4, S) == pytest.approx(1500)
    assert wire_bytes("reduce_scatter", 4, S) == wire_bytes("all_gather", 4, S) == pytest.approx(750)
    assert wire_bytes("send", 1, S) == wire_bytes("send", 8, S) == wire_bytes("broadcast", 8, S) == S
    assert ring_steps("all_reduce", 4) == 6 and ring_steps("send", 2) == 1 and ring_steps("all_gather", 1) == 0
    with pytest.raises(KeyError):  # an operation the table does not know is not priced as some other one
        wire_bytes("gather", 4, S)  # (all_to_all is priced: expert parallelism)


@given(n=st.integers(1, 4096), S=st.integers(0, 10**12))
def test_ring_all_reduce_is_reduce_scatter_plus_all_gather(n: int, S: int) -> None:
    ar = wire_bytes("all_reduce", n, S)
    assert ar == pytest.approx(wire_bytes("reduce_scatter", n, S) + wire_bytes("all_gather", n, S))
    assert 0 <= ar < 2 * S or S == 0
    assert ring_steps("all_reduce", n) == ring_steps("reduce_scatter", n) + ring_steps("all_gather", n)


@given(p=st.integers(1, 128), m=st.integers(1, 512), v=st.integers(1, 16),
       schedule=st.sampled_from(["gpipe", "1f1b", "interleaved"]))
def test_bubble_in_unit_interval_and_shrinks(p: int, m: int, v: int, schedule: str) -> None:
    b = bubble_fraction(schedule, p, m, v)
    assert 0 <= b < 1
    assert bubble_fraction(schedule, p, m + 1, v) <= b
    assert bubble_fraction("interleaved", p, m, v) <= bubble_fraction("1f1b", p, m)




@given(schedule=st.sampled_from(["gpipe", "1f1b", "interleaved"]), p=st.integers(1, 64),
       mult=st.integers(1, 8), v=st.integers(1, 8))
def test_in_flight_never_grows_with_stage(schedule: str, p: int, mult: int, v: int) -> None:
    """The grouping of alike stages in cost.py relies on this."""
    m = p * mult
    counts = [in_flight_microbatches(schedule, p, m, v, i) for i in range(p)]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert all(c >= 1 for c in counts)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("n,m", [(1, 1), (2, 1), (4, 3), (8, 4)])
def test_dp_parts_are_zero_comm_per_step_per_parameter(zero: int, n: int, m: int) -> None:
    """The planner's per-parameter collectives (dp_parts, 4 bytes per gradient and parameter) and
    the runtime's per-bucket ones (zero_comm_per_step, one bucket of 4 psi bytes) are the same
    operations with the same payloads; the runtime adds only ZeRO's 4-byte gradient-norm sum."""
    psi = 1000
    runtime = zero_comm_per_step(zero, [4 * psi], m)
    runtime.pop("grad_norm", None)
    planner: dict[str, int] = {}
    for op, per_param, _, times in dp_parts(zero, m, n, 4, 4):
        planner[op] = planner.get(op, 0) + int(times * per_param * psi)
    if n == 1:
        assert planner == {}  # a group of one moves nothing
    else:
        assert planner == {op: nbytes for op, (_, nbytes) in runtime.items()}
