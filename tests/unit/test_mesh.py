"""Rank <-> coordinate math and group membership (pure; no processes)."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paratrain.mesh import AXES, MeshShape

SHAPES = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (2, 2, 1), (3, 2, 2), (1, 4, 2)]


@pytest.mark.parametrize("dp,pp,tp", SHAPES)
def test_coords_roundtrip_and_tp_adjacent(dp, pp, tp):
    shape = MeshShape(dp, pp, tp)
    seen = set()
    for r in range(shape.world_size):
        c = shape.coords(r)
        assert shape.rank_of(*c) == r
        seen.add(tuple(c))
    assert len(seen) == shape.world_size
    # tp ranks are adjacent: a tp group is a run of consecutive ranks
    for g in shape.all_groups("tp"):
        assert g == list(range(g[0], g[0] + tp))


def test_explicit_2x2x2_layout():
    shape = MeshShape(dp=2, pp=2, tp=2)
    # rank = (pp * dp + dp_i) * tp + tp_i
    assert shape.coords(5) == (0, 1, 1, 0)  # dp 0, pp 1, tp 1 (cp 0)
    assert shape.group_ranks("tp", 5) == [4, 5]
    assert shape.group_ranks("dp", 5) == [5, 7]
    assert shape.group_ranks("pp", 5) == [1, 5]
    assert sorted(shape.all_groups("dp")) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(shape.all_groups("pp")) == [[0, 4], [1, 5], [2, 6], [3, 7]]


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_groups_partition_the_ranks(dp, pp, tp):
    shape = MeshShape(dp, pp, tp)
    for axis in AXES:
        groups = shape.all_groups(axis)
        flat = sorted(itertools.chain.from_iterable(groups))
        assert flat == list(range(shape.world_size)), axis
        assert all(len(g) == shape.size(axis) for g in groups)
        for g in groups:  # members differ only along `axis`
            coords = [shape.coords(r) for r in g]
            for other in AXES:
                if other != axis:
                    assert len({getattr(c, other) for c in coords}) == 1
            assert [getattr(c, axis) for c in coords] == list(range(shape.size(axis)))


def test_rejects_bad_degrees_and_ranks():
    with pytest.raises(ValueError):
        MeshShape(0, 1, 1)
    with pytest.raises(ValueError):
        MeshShape(2, 1, 1).coords(2)


def test_single_process_mesh_is_noop():
    import torch

    from paratrain import comm
    from paratrain.mesh import Mesh

    mesh = Mesh.build(MeshShape(), 0)
    assert repr(mesh) == "Mesh(rank=0, dp=0/1, pp=0/1, tp=0/1)"
    assert mesh.dpcp is mesh.dp and mesh.cp.size == 1  # cp = 1: no extra group
    t = torch.ones(3)
    assert comm.all_reduce(t, mesh.dp) is None
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert mesh.dp.stats.calls == 0


def test_cp_sits_between_dp_and_tp():
    # rank = ((pp * dp + dp_i) * cp + cp_i) * tp + tp_i; cp = 1 numbers ranks as before
    shape = MeshShape(dp=2, pp=2, tp=2, cp=2)
    assert shape.world_size == 16
    assert shape.rank_of(dp=0, pp=1, tp=1, cp=0) == 9 and shape.coords(9) == (0, 1, 1, 0)
    assert shape.coords(13) == (1, 1, 1, 0)
    assert shape.group_ranks("cp", 5) == [5, 7]
    assert shape.group_ranks("tp", 5) == [4, 5]
    assert shape.group_ranks("dp", 5) == [1, 5]
    assert shape.group_ranks("pp", 5) == [5, 13]
    # the gradient-averaging group: every (dp, cp) of this rank's (pp, tp)
    assert shape.group_ranks(("dp", "cp"), 5) == [1, 3, 5, 7]
    assert sorted(shape.all_groups(("dp", "cp"))) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert MeshShape(2, 2, 2).coords(5) == MeshShape(2, 2, 2, cp=1).coords(5) == (0, 1, 1, 0)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))
def test_cp_groups_partition_the_ranks(dp, pp, tp, cp):
    shape = MeshShape(dp, pp, tp, cp)
    for r in range(shape.world_size):
        assert shape.rank_of(**shape.coords(r)._asdict()) == r
    for axes in ("cp", ("dp", "cp")):
        groups = shape.all_groups(axes)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(shape.world_size))
        size = cp if axes == "cp" else dp * cp
        for g in groups:  # members share pp and tp (and dp, for a cp group)
            coords = [shape.coords(r) for r in g]
            assert len(g) == size
            assert len({(c.pp, c.tp) for c in coords}) == 1
            if axes == "cp":
                assert len({c.dp for c in coords}) == 1 and [c.cp for c in coords] == list(range(cp))
    if tp > 1:  # tp stays innermost: a tp group is a run of consecutive ranks
        assert all(g == list(range(g[0], g[0] + tp)) for g in shape.all_groups("tp"))
