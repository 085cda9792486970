"""Every collective and point-to-point transfer paratrain makes goes through this module.

Each call takes an explicit :class:`Group` (never a global) and records, per operation, the
number of calls, the payload bytes and the seconds the caller was blocked. A group of size 1 is
the same code path as a no-op: nothing is sent and nothing is recorded.

Byte accounting (``bytes`` below is the payload ``S`` of the full tensor; ``wire_bytes`` is what
one device sends with the ring algorithms NCCL and gloo use for large tensors, n = group size),
counted with :func:`paratrain.core.ring.wire_bytes`, the function the planner prices with:

    all_reduce      S            wire 2(n-1)/n * S
    reduce_scatter  S (input)    wire (n-1)/n * S
    all_gather      S (output)   wire (n-1)/n * S
    broadcast       S            wire S on the root, 0 elsewhere (lower bound)
    send / recv     S            wire S on the sender, 0 on the receiver
    all_to_all      S (input)    wire S minus this rank's own split (its part to itself stays);
                                 (n-1)/n * S when the splits are equal
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from paratrain.core.ring import wire_bytes


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0
    wire_bytes: float = 0.0
    seconds: float = 0.0


class CommStats:
    """Counters for one group, keyed by operation name."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = defaultdict(OpStats)

    def record(self, op: str, nbytes: int, wire: float, seconds: float = 0.0) -> None:
        s = self.ops[op]
        s.calls += 1
        s.bytes += nbytes
        s.wire_bytes += wire
        s.seconds += seconds

    def add_seconds(self, op: str, seconds: float) -> None:
        self.ops[op].seconds += seconds

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.ops.values())

    @property
    def wire_bytes(self) -> float:
        return sum(s.wire_bytes for s in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.ops.values())

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.ops.values())

    def reset(self) -> None:
        self.ops.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {op: vars(s).copy() for op, s in sorted(self.ops.items())}


class Group:
    """One process group of the mesh: its name (``dp``/``pp``/``tp``/``world``), the global
    ranks it contains in order, this process's index in it, and its communication counters.
    ``pg`` is None for a group of size 1 (every operation on it is a no-op)."""

    def __init__(self, name: str, ranks: Sequence[int], rank: int, pg: Any = None) -> None:
        self.name = name
        self.ranks = tuple(ranks)
        self.size = len(self.ranks)
        self.rank = rank
        self.pg = pg
        self.stats = CommStats()
        assert self.size == 1 or pg is not None, "a group of several ranks needs a process group"

    def __repr__(self) -> str:
        return f"Group({self.name}, rank={self.rank}/{self.size}, ranks={list(self.ranks)})"

    def global_rank(self, index: int) -> int:
        return self.ranks[index]


def single_group(name: str, global_rank: int = 0) -> Group:
    """A group holding only this process: every operation is a no-op."""
    return Group(name, [global_rank], 0, None)


def new_group(name: str, ranks: Sequence[int], my_rank: int, timeout_s: float | None = None) -> Group | None:
    """Create the process group for ``ranks``. Must be called by *every* rank, for every group,
    in the same order (a torch.distributed requirement). Returns the Group if this rank is a
    member, else None."""
    ranks = list(ranks)
    if len(ranks) == 1:
        return single_group(name, ranks[0]) if my_rank in ranks else None
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        import datetime

        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    pg = dist.new_group(ranks, **kwargs)
    if my_rank not in ranks:
        return None
    return Group(name, ranks, ranks.index(my_rank), pg)


class Handle:
    """An in-flight asynchronous operation. ``wait()`` blocks until it completes, adds the
    blocked time to the group's counters and drops the underlying work object (holding it past
    the end of the process is what makes gloo abort at exit)."""

    __slots__ = ("_work", "_stats", "_op")

    def __init__(self, work: Any, stats: CommStats, op: str) -> None:
        self._work = work
        self._stats = stats
        self._op = op

    def wait(self) -> None:
        if self._work is None:
            return
        t0 = time.perf_counter()
        self._work.wait()
        self._stats.add_seconds(self._op, time.perf_counter() - t0)
        self._work = None

    @property
    def done(self) -> bool:
        return self._work is None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
               "avg": dist.ReduceOp.AVG}


def _run(group: Group, op: str, nbytes: int, wire: float, fn: Any, async_op: bool) -> Handle | None:
    if async_op:
        group.stats.record(op, nbytes, wire)
        return Handle(fn(True), group.stats, op)
    t0 = time.perf_counter()
    fn(False)
    group.stats.record(op, nbytes, wire, time.perf_counter() - t0)
    return None


def all_reduce(tensor: torch.Tensor, group: Group, op: str = "sum", async_op: bool = False,
               tag: str | None = None) -> Handle | None:
    """In place: every rank ends with the reduction (sum/max/min/avg) of all ranks' ``tensor``.
    ``tag`` files the call under another name in the counters (e.g. ``"metrics"``), so traffic
    that is not part of the algorithm can be told apart from gradient traffic."""
    if group.size == 1:
        return None
    n, s = group.size, _nbytes(tensor)
    red = _REDUCE_OPS[op]
    return _run(group, tag or "all_reduce", s, wire_bytes("all_reduce", n, s),
                lambda a: dist.all_reduce(tensor, op=red, group=group.pg, async_op=a), async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: Group, op: str = "sum",
                   async_op: bool = False, tag: str | None = None) -> Handle | None:
    """``output`` (1/n of ``input`` along dim 0) = this rank's shard of the reduction of ``input``."""
    if group.size == 1:
        output.copy_(input)
        return None
    n, s = group.size, _nbytes(input)
    red = _REDUCE_OPS[op]
    return _run(group, tag or "reduce_scatter", s, wire_bytes("reduce_scatter", n, s),
                lambda a: dist.reduce_scatter_single(output, input, op=red, group=group.pg, async_op=a),
                async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, group: Group, async_op: bool = False,
               tag: str | None = None) -> Handle | None:
    """``output`` (n times ``input`` along dim 0) = every rank's ``input``, in group order."""
    if group.size == 1:
        output.copy_(input)
        return None
    n, s = group.size, _nbytes(output)
    return _run(group, tag or "all_gather", s, wire_bytes("all_gather", n, s),
                lambda a: dist.all_gather_single(output, input, group=group.pg, async_op=a),
                async_op)


def broadcast(tensor: torch.Tensor, src_index: int, group: Group, async_op: bool = False,
              tag: str | None = None) -> Handle | None:
    """Copy the tensor of group member ``src_index`` to every member, in place."""
    if group.size == 1:
        return None
    s = _nbytes(tensor)
    src = group.global_rank(src_index)
    wire = wire_bytes("broadcast", group.size, s) if group.rank == src_index else 0.0
    return _run(group, tag or "broadcast", s, wire,
                lambda a: dist.broadcast(tensor, src=src, group=group.pg, async_op=a), async_op)


def all_to_all(output: torch.Tensor, input: torch.Tensor, group: Group,
               output_splits: list[int] | None = None, input_splits: list[int] | None = None,
               tag: str | None = None) -> None:
    """Rows ``input_splits[j]`` of ``input`` (dim 0, in group order) go to member j; ``output``
    receives ``output_splits[i]`` rows from each member i, in group order (None: equal splits).
    At size 1 ``output`` is a copy of ``input``."""
    if group.size == 1:
        output.copy_(input)
        return
    s = _nbytes(input)
    row = s // max(input.shape[0], 1) if input.dim() else s
    own = (input_splits[group.rank] * row) if input_splits is not None else s // group.size
    _run(group, tag or "all_to_all", s, float(s - own),
         lambda a: dist.all_to_all_single(output, input, output_splits, input_splits, group=group.pg, async_op=a),
         False)


def barrier(group: Group) -> None:
    if group.size > 1:
        dist.barrier(group=group.pg)


@dataclass
class P2P:
    """One point-to-point transfer for :func:`batch_p2p`: ``kind`` is "send" or "recv" and
    ``peer`` the index of the other rank *in the group*."""

    kind: str
    tensor: torch.Tensor
    peer: int


def _post_p2p(ops: Sequence[P2P], group: Group, tag: str | None) -> list[Any]:
    assert group.size > 1, "point-to-point needs a group of at least two ranks"
    p2p = []
    for o in ops:
        fn = dist.isend if o.kind == "send" else dist.irecv
        p2p.append(dist.P2POp(fn, o.tensor, group.global_rank(o.peer), group=group.pg))
        s = _nbytes(o.tensor)
        wire = wire_bytes("send", group.size, s) if o.kind == "send" else 0.0
        group.stats.record(f"{tag}_{o.kind}" if tag else o.kind, s, wire)
    return dist.batch_isend_irecv(p2p)


def batch_p2p(ops: Sequence[P2P], group: Group, async_op: bool = False,
              tag: str | None = None) -> Handle | None:
    """Post several sends/receives together (one batched call; avoids ordering deadlocks).
    ``tag`` files them under ``<tag>_send``/``<tag>_recv`` instead of ``send``/``recv``."""
    if not ops:
        return None
    handle = Handle(_WorkList(_post_p2p(ops, group, tag)), group.stats, "p2p_wait")
    if async_op:
        return handle
    handle.wait()
    return None


def post_p2p(ops: Sequence[P2P], group: Group) -> list[Handle]:
    """Like :func:`batch_p2p` (one batched call, asynchronous), but one handle per operation, so
    each transfer can be waited for when its tensor is needed. A backend that fuses the batch
    into one request (NCCL) gives every operation that same request: waiting for one then
    waits for the whole batch, which is still correct."""
    if not ops:
        return []
    works = _post_p2p(ops, group, None)
    if len(works) == len(ops):
        return [Handle(w, group.stats, "p2p_wait") for w in works]
    shared = _WorkList(works)
    return [Handle(shared, group.stats, "p2p_wait") for _ in ops]


class _WorkList:
    def __init__(self, works: list[Any]) -> None:
        self.works = works

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


def wait_all(handles: list[Handle | None]) -> None:
    """Wait for every handle and empty the list."""
    for h in handles:
        if h is not None:
            h.wait()
    handles.clear()


def summarize(groups: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """JSON-friendly totals per group name."""
    return {g.name: {"bytes": g.stats.bytes, "wire_bytes": g.stats.wire_bytes,
                     "seconds": g.stats.seconds, "calls": g.stats.calls, "ops": g.stats.as_dict()}
            for g in groups}
