"""Group ``ckpt``: our sharded checkpoints vs ``torch.distributed.checkpoint`` (DCP), sync and async.

The same training state (a session of ``--model`` after one step: parameters, AdamW moments,
each rank its own shards) is saved and loaded by both in the same processes, alternating A/B,
medians over ``--repeats``. DCP gets the tensors each rank owns (its shards; a replica's copy
only once) under rank-unique keys (plain tensors are "replicated" to DCP, so shared keys would
keep one rank's shard): it writes what we write.
Rows (``ratio`` = DCP seconds / ours, higher is better):

* ``save``: a synchronous save, start to files on disk (ours: ``--no-async-checkpoint``);
* ``blocked``: how long training waits for an asynchronous save (ours: the copy to host
  memory; DCP: ``async_save`` until it returns its future); with the CPU seconds of our
  training thread in it (``ours_blocked_cpu_s``, rank 0: what a loaded machine does not
  inflate) and every rank's medians (``blocked_s_by_rank``, ``blocked_cpu_s_by_rank``);
* ``load``: reading it back into the same layout;
* ``load-resharded``: into one process (dp 1, no sharding) from the sharded save. Ours reads
  every box from the files that hold it. DCP reshards only state it saved as DTensors, so its
  side of this row is its own natural sharding of the same values: every global tensor (the
  reference's names and shapes) as a DTensor ``Shard(0)`` over all the ranks (FSDP2's layout;
  the scalar step ``Replicate``), saved once by the same ranks, then loaded with ``dcp.load``
  into plain full tensors in one process. Both sides read every byte of the model once.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paratrain.bench import BenchOptions, median

LAYOUTS = {"dp2-zero3": dict(dp=2, zero=3), "dp2xtp2": dict(dp=2, tp=2)}


@dataclass
class TimeRow:
    """A row of seconds (lower is better); ``ratio`` = reference / ours."""

    name: str
    ours_s: float
    ref_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if self.ref_s is None else self.ref_s / self.ours_s

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ours_s": self.ours_s, "ref_s": self.ref_s, "ratio": self.ratio, **self.extra}


def run(opts: BenchOptions) -> list[TimeRow]:
    from paratrain.bench import rank_worker
    from paratrain.launch import launch

    rows: list[TimeRow] = []
    for name, layout in LAYOUTS.items():
        world = layout.get("dp", 1) * layout.get("tp", 1)
        root = Path(tempfile.mkdtemp(prefix="paratrain-bench-ckpt-"))
        try:
            r = launch(rank_worker, (_measure, _Args(opts, layout, str(root))), world)[0]
            single = launch(rank_worker, (_reshard, _Args(opts, {"dp": 1}, str(root))), 1)[0]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        base = {"model": opts.model, "nproc": world, "ours_bytes": r["ours_bytes"], "ref_bytes": r["dcp_bytes"]}
        rows += [TimeRow(f"{name}-save", median(r["ours_save"]), median(r["dcp_save"]), dict(base)),
                 TimeRow(f"{name}-blocked", median(r["ours_blocked"]), median(r["dcp_blocked"]),
                         dict(base, blocked_share_of_sync_save=median(r["ours_blocked"]) / median(r["ours_save"]),
                              ours_blocked_cpu_s=median(r["ours_blocked_cpu"]),
                              blocked_s_by_rank=[w for w, _ in r["blocked_by_rank"]],
                              blocked_cpu_s_by_rank=[c for _, c in r["blocked_by_rank"]])),
                 TimeRow(f"{name}-load", median(r["ours_load"]), median(r["dcp_load"]), dict(base)),
                 TimeRow(f"{name}-load-resharded", median(single["ours_load"]), median(single["dcp_load"]),
                         dict(base, note="into dp 1; DCP from its DTensor Shard(0) save of the same values"))]
    return rows


@dataclass(frozen=True)
class _Args:
    """What ``rank_worker`` hands each rank (it reads ``threads`` like BenchOptions')."""

    opts: BenchOptions
    layout: dict[str, Any]
    root: str

    @property
    def threads(self) -> int:
        return self.opts.threads


def _session(a: _Args, rank: int) -> Any:
    import torch

    from paratrain.config import Layout, TrainConfig
    from paratrain.launch import RankEnv
    from paratrain.train import setup, train_step

    cfg = TrainConfig(model=a.opts.model, global_batch=a.opts.global_batch, seq_len=a.opts.seq_len,
                      layout=Layout(**a.layout), seed=a.opts.seed, steps=2, eval_every=0, sample_tokens=0,
                      progress=False)
    s = setup(cfg, RankEnv.from_env(), torch.device("cpu"))
    train_step(s, 1)  # AdamW state exists
    return s


def _dcp_state(s: Any, rank: int) -> dict[str, Any]:
    from paratrain.checkpoint import holdings as hd

    hs = hd.holdings(s.pm, s.opt)  # what this rank owns: what we write (replicas write nothing)
    return {f"r{rank}.{i}": h.tensor for i, h in enumerate(hs) if h.owned}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _measure(a: _Args, rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from paratrain.checkpoint import manifest as mf
    from paratrain.checkpoint import session as ck
    from paratrain.checkpoint.store import CheckpointSaver

    s = _session(a, rank)
    root = Path(a.root)
    out: dict[str, list[float]] = {k: [] for k in ("ours_save", "dcp_save", "ours_blocked", "ours_blocked_cpu",
                                                   "dcp_blocked", "ours_load", "dcp_load")}
    state = _dcp_state(s, rank)
    sync = CheckpointSaver(root / "ours", rank, world, dist.barrier, asynchronous=False)
    background = CheckpointSaver(root / "ours", rank, world, dist.barrier, asynchronous=True)
    for i in range(a.opts.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        ck.save(sync, s, 10 + 2 * i, {"model": a.opts.model})
        out["ours_save"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(root / f"dcp-{i}"))
        dist.barrier()
        out["dcp_save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        ck.save(background, s, 11 + 2 * i, {"model": a.opts.model})
        out["ours_blocked"].append(time.perf_counter() - t0)
        out["ours_blocked_cpu"].append(time.thread_time() - c0)
        background.wait()
        dist.barrier()
        t0 = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(root / f"dcp-async-{i}"))
        out["dcp_blocked"].append(time.perf_counter() - t0)
        future.result()
        dist.barrier()
    folder = root / "ours" / (root / "ours" / "latest").read_text().strip()
    m = mf.read(folder)
    for i in range(a.opts.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        ck.load(s, folder, m)
        dist.barrier()
        out["ours_load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dcp.load(state, checkpoint_id=str(root / f"dcp-{i}"))
        dist.barrier()
        out["dcp_load"].append(time.perf_counter() - t0)
    _save_dtensors(folder, m, root / "dcp-dtensor", world)
    by_rank = [None] * world  # every rank's medians of its blocked seconds, wall and CPU
    dist.all_gather_object(by_rank, (median(out["ours_blocked"]), median(out["ours_blocked_cpu"])))
    return dict(out, ours_bytes=_size(folder), dcp_bytes=_size(root / "dcp-0"), blocked_by_rank=by_rank)


def _full_state(folder: Path, m: Any) -> dict[str, Any]:
    """Every global tensor of our checkpoint, whole (read through our reader)."""
    import torch

    from paratrain.checkpoint.boxes import full_box
    from paratrain.checkpoint.store import CheckpointReader

    reader = CheckpointReader(folder, m)
    out = {}
    for name, entry in m.tensors.items():
        out[name] = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        reader.fill(name, full_box(entry.shape), out[name])
    return out


def _save_dtensors(folder: Path, m: Any, path: Path, world: int) -> None:
    """DCP's own sharded save of the same values: each global tensor ``Shard(0)`` over the ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = {name: distribute_tensor(t, mesh, [Shard(0)] if t.dim() else [Replicate()], src_data_rank=None)
             for name, t in _full_state(folder, m).items()}
    dcp.save(state, checkpoint_id=str(path))


def _reshard(a: _Args, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from paratrain.checkpoint import session as ck
    from paratrain.checkpoint.store import find_valid

    s = _session(a, rank)
    folder, m, _ = find_valid(Path(a.root) / "ours")
    state = {name: torch.empty(e.shape, dtype=getattr(torch, e.dtype)) for name, e in m.tensors.items()}
    out: dict[str, list[float]] = {"ours_load": [], "dcp_load": []}
    for _ in range(a.opts.repeats):
        t0 = time.perf_counter()
        ck.load(s, folder, m)
        out["ours_load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dcp.load(state, checkpoint_id=str(Path(a.root) / "dcp-dtensor"), no_dist=not dist.is_initialized())
        out["dcp_load"].append(time.perf_counter() - t0)
    return out
