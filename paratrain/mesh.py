"""The process topology of one layout.

Ranks are laid out with tensor parallelism innermost (tp ranks adjacent: they talk the most and
share a node), context parallelism next (the ring passes keys and values every attention layer),
then data parallelism, and pipeline parallelism outermost (stages exchange only activations, so
they tolerate the slowest links)::

    rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index

At ``cp = 1`` this is the ``dp x pp x tp`` numbering of before. Gradients of replicated
parameters are averaged over the ``dp x cp`` ranks of a (pp, tp) coordinate (every one of them
saw different tokens): the ``dpcp`` group, which *is* the dp group when ``cp = 1``.

Expert parallelism sub-divides dp (docs/expert.md): dp index ``d = edp_index * ep + ep_index``,
so the ``ep`` group (the ranks that exchange tokens by all-to-all, each holding E / ep experts)
is ``ep`` consecutive dp indices, and the ``edp`` group (the dp / ep ranks holding the same
experts, which average their gradients) the dp indices ``ep`` apart. At ``ep = 1`` the ep group
is this rank alone and ``edp`` is the dp group.

:class:`MeshShape` is pure arithmetic (no torch.distributed, unit-tested on its own);
:class:`Mesh` adds this rank's three process groups and is passed explicitly to whatever needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from paratrain.comm import Group

AXES = ("dp", "pp", "tp", "cp")
DPCP = ("dp", "cp")  # the axes of the gradient-averaging group (``Mesh.dpcp``)


class Coords(NamedTuple):
    dp: int
    pp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True)
class MeshShape:
    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1  # divides dp; not an axis of its own (see the module docstring)

    def __post_init__(self) -> None:
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"mesh degree {axis} must be >= 1, got {getattr(self, axis)}")
        if self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"ep={self.ep} must be >= 1 and divide dp={self.dp}")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a mesh of {self.world_size} ranks")
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = (rank // (self.tp * self.cp)) % self.dp
        pp = rank // (self.tp * self.cp * self.dp)
        return Coords(dp, pp, tp, cp)

    def rank_of(self, dp: int, pp: int, tp: int, cp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def group_ranks(self, axis: str | tuple[str, ...], rank: int) -> list[int]:
        """Global ranks of ``rank``'s group along ``axis`` (or along several axes: the ranks that
        differ from ``rank`` only there, e.g. ``("dp", "cp")``), in increasing rank order --
        for one axis, the order of the index on that axis."""
        axes = (axis,) if isinstance(axis, str) else tuple(axis)
        c = self.coords(rank)
        members = [rank - sum(getattr(c, a) * self.stride(a) for a in axes)]  # this rank at index 0
        for a in axes:
            members = [m + i * self.stride(a) for m in members for i in range(self.size(a))]
        return sorted(members)

    def stride(self, axis: str) -> int:
        """How far apart in rank two neighbours along ``axis`` are."""
        inner = {"tp": (), "cp": ("tp",), "dp": ("tp", "cp"), "pp": ("tp", "cp", "dp")}[axis]
        return math.prod(self.size(a) for a in inner)

    def expert_groups(self, kind: str) -> list[list[int]]:
        """Every ``"ep"`` group (ep consecutive dp indices) or ``"edp"`` group (the dp indices ep
        apart) of the mesh, in a fixed order: each a subset of a dp group."""
        out = []
        for dp_group in self.all_groups("dp"):  # in dp-index order
            if kind == "ep":
                out += [dp_group[s:s + self.ep] for s in range(0, self.dp, self.ep)]
            else:
                out += [dp_group[j::self.ep] for j in range(self.ep)]
        return out

    def all_groups(self, axis: str | tuple[str, ...]) -> list[list[int]]:
        """Every group along ``axis`` (a partition of all ranks), in a fixed order."""
        seen: dict[tuple[int, ...], None] = {}
        for r in range(self.world_size):
            seen.setdefault(tuple(self.group_ranks(axis, r)), None)
        return [list(g) for g in seen]


class Mesh:
    """This rank's place in the mesh and its ``dp``, ``pp``, ``tp`` and ``cp`` groups, plus ``world``
    and ``dpcp`` (the dp x cp ranks that average gradients; the dp group itself when cp = 1)."""

    def __init__(self, shape: MeshShape, rank: int, groups: dict[str, Group],
                 timeout_s: float | None = None) -> None:
        self.shape = shape
        self.timeout_s = timeout_s
        self.rank = rank
        self.coords = shape.coords(rank)
        self.dp = groups["dp"]
        self.pp = groups["pp"]
        self.tp = groups["tp"]
        self.cp = groups["cp"]
        self.dpcp = groups.get("dpcp", self.dp)
        if "ep" not in groups:  # no expert parallelism: this rank alone
            from paratrain import comm

            groups["ep"] = comm.single_group("ep", rank)
        self.ep = groups["ep"]
        self.edp = groups.get("edp", self.dp)
        self.world = groups["world"]

    def __repr__(self) -> str:
        c, s = self.coords, self.shape
        cp = f", cp={c.cp}/{s.cp}" if s.cp > 1 else ""
        ep = f", ep={self.ep.rank}/{s.ep}" if s.ep > 1 else ""
        return f"Mesh(rank={self.rank}, dp={c.dp}/{s.dp}{ep}, pp={c.pp}/{s.pp}{cp}, tp={c.tp}/{s.tp})"

    @property
    def groups(self) -> list[Group]:
        extra = [self.dpcp] if self.dpcp is not self.dp else []
        extra += [self.ep, self.edp] if self.ep.size > 1 else []
        return [self.dp, self.pp, self.tp, self.cp, *extra, self.world]

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.shape.pp - 1

    @classmethod
    def build(cls, shape: MeshShape, rank: int, timeout_s: float | None = None) -> Mesh:
        """Create every group of the mesh. With more than one rank, torch.distributed must be
        initialised and every rank must call this (groups are created collectively)."""
        from paratrain import comm

        groups: dict[str, Group] = {}
        if shape.world_size == 1:
            for axis in (*AXES, "world"):
                groups[axis] = comm.single_group(axis, rank)
            return cls(shape, rank, groups, timeout_s)
        import torch.distributed as dist

        groups["world"] = comm.Group("world", list(range(shape.world_size)), rank, dist.group.WORLD)
        named: list[tuple[str, str | tuple[str, ...]]] = [(a, a) for a in AXES]
        if shape.cp > 1:
            named.append(("dpcp", DPCP))
        experts = [(kind, shape.expert_groups(kind)) for kind in ("ep", "edp")] if shape.ep > 1 else []
        for name, all_members in [(n, shape.all_groups(axes)) for n, axes in named] + experts:
            for members in all_members:
                g = comm.new_group(name, members, rank, timeout_s)
                if g is not None:
                    groups[name] = g
        return cls(shape, rank, groups, timeout_s)

    def build_groups(self, name: str, all_members: list[list[int]]) -> Group | None:
        """Create further groups (e.g. the first and last pipeline stage of every (dp, tp)
        coordinate), with the mesh's timeout. Collective: every rank calls it with the same list
        in the same order. Returns the group holding this rank, or None."""
        from paratrain import comm

        mine = None
        for members in all_members:
            g = comm.new_group(name, members, self.rank, self.timeout_s)
            if g is not None:
                mine = g
        return mine
