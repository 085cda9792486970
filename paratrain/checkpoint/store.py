"""Writing and reading sharded checkpoints: each rank its own safetensors file, one manifest.

Saving step ``N`` into ``ROOT`` (``OUT/checkpoints``)::

    begin       rank 0 clears stale ``.step-*.partial`` folders, creates ``.step-N.partial``; barrier
                (a saver's first save; later ones: each rank creates it, asynchronously off the
                training thread)
    stage       every rank copies its boxes into its reused host buffer  <- the only time training waits
    write       every rank writes ``rankRRRRR.safetensors`` straight from that buffer (temporary
                name, fsync, rename; SHA-256 computed alongside, :mod:`.writer`), then its fragment
                ``rankRRRRR.json`` (what the file holds, its SHA-256): its "done" mark
    commit      rank 0 waits for every fragment (and gives up at once if a rank on this machine
                has exited without one: see :func:`register`), merges them into ``manifest.json`` (fsynced, then
                one fsync of the folder makes every rank's rename durable), renames the folder to
                ``step-N``, fsyncs the parent and only then points ``latest`` at it; keeps the newest K

A crash at any moment leaves either the previous ``latest`` (and its folder) untouched or the new
one complete. ``write`` and ``commit`` need no collective, so they run on the saver's writer
thread (:class:`CheckpointSaver`, at most one save in flight) while training goes on.

Loading never unpickles anything: tensors come through safetensors, metadata through JSON. A
rank asks :class:`CheckpointReader` for the boxes it needs and reads only their intersections
with the saved pieces.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from paratrain.checkpoint import manifest as mf
from paratrain.checkpoint.atomic import atomic_write_bytes, fsync_dir, sha256_file
from paratrain.checkpoint.boxes import Box, intersect, lengths, numel, relative
from paratrain.checkpoint.manifest import CheckpointError, Manifest, Piece, TensorEntry
from paratrain.checkpoint.writer import HostBuffer, Shard, Staged, write_file

__all__ = ["LATEST", "CheckpointReader", "CheckpointSaver", "Shard", "begin", "commit", "find_valid", "stage",
           "step_dir", "verify", "write_rank"]

LATEST = "latest"
LOOK_S = 0.25  # how often a waiting commit looks whether the ranks it waits for still run
EXITED_UNWRITTEN = "exited before writing its part"  # paratrain.failures: a lost peer, not a cause


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def _partial_dir(root: Path, step: int) -> Path:
    return root / f".step-{step}.partial"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def begin(root: Path, step: int, rank: int, barrier: Callable[[], None], first: bool = True) -> Path:
    """Every rank calls it at the same step; returns the folder the save writes into.

    The ``first`` save of a saver clears every partial folder (what a crashed attempt left: a
    stale fragment of this step must not pass for a fresh one) and waits for all ranks. A later
    save needs no barrier, so training does not wait for the slowest rank to arrive: each rank
    creates the folder if it is not there, and rank 0 removes only other steps' partial folders,
    which no rank writes to any more (rank 0 waited for the previous commit, and that commit
    waited for every rank's last file)."""
    folder = _partial_dir(root, step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.partial"):
            if first or stale.name != folder.name:
                shutil.rmtree(stale, ignore_errors=True)
    if first:
        if rank == 0:
            folder.mkdir()
        register(root, rank)
        barrier()
    else:
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _machine() -> str | None:
    """What makes a pid mean the same process here and in a peer: the kernel's boot and the pid
    namespace (two containers on one host share the first, not the second). None without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _pid_file(root: Path, rank: int) -> Path:
    return root / f".rank{rank:05d}.pid"


def register(root: Path, rank: int) -> None:
    """Leave this rank's process id in ``root`` (before the first save's barrier, so rank 0's
    commits see this attempt's ids, not a crashed attempt's): a commit waiting for the fragment of
    a rank that was killed (SIGKILL, the OOM killer) gives up at once instead of after the timeout.
    A collective notices a dead peer by its closed connection; a file that never comes does not."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_pid_file(root, rank), json.dumps({"machine": _machine(), "pid": os.getpid()}).encode())


def exited(root: Path, rank: int) -> int | None:
    """The pid of ``rank``'s process if it runs on this machine and has exited; None if it runs,
    runs elsewhere (it cannot be looked at from here) or never registered."""
    from paratrain.rank import process_alive

    try:
        record = json.loads(_pid_file(root, rank).read_text())
    except (OSError, ValueError):
        return None
    here = _machine()
    if here is None or record.get("machine") != here or process_alive(int(record["pid"])):
        return None
    return int(record["pid"])


def stage(shards: Iterable[Shard], local: dict[str, torch.Tensor] | None = None,
          buffer: HostBuffer | None = None) -> Staged:
    """Host copies of every shard and of the rank-local tensors (RNG states), detached from
    training, in ``buffer`` (a fresh one by default; a saver passes its own, reused)."""
    return (buffer or HostBuffer()).stage(list(shards), dict(local or {}))


def write_rank(folder: Path, rank: int, staged: Staged) -> None:
    """This rank's file, then its fragment (written last: its presence means the file is whole
    and fsynced). The rank-local tensors are restored only into the same rank of the same layout."""
    file = _rank_file(rank)
    digest, size = write_file(folder / file, staged)
    fragment = {"file": file, "sha256": digest, "bytes": size, "local": staged.local, "tensors": staged.tensors}
    tmp = folder / f".rank{rank:05d}.json.tmp"  # rank 0 must never read half a fragment
    tmp.write_text(json.dumps(fragment, separators=(",", ":")))
    os.replace(tmp, folder / f"rank{rank:05d}.json")


def commit(root: Path, step: int, world_size: int, meta: dict[str, Any], keep: int,
           timeout_s: float) -> Path:
    """Rank 0: merge the fragments into the manifest, publish the folder, then ``latest``."""
    folder = _partial_dir(root, step)
    names = [folder / f"rank{r:05d}.json" for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    next_look = time.monotonic() + LOOK_S
    while not all(p.exists() for p in names):
        now = time.monotonic()
        if now > deadline:
            missing = [p.name for p in names if not p.exists()]
            raise CheckpointError(f"checkpoint of step {step}: ranks did not finish writing within "
                                  f"{timeout_s:.0f} s (missing {', '.join(missing[:4])}).")
        if now > next_look:  # a peer killed outright writes nothing: do not wait out the timeout
            next_look = now + LOOK_S
            for r, p in enumerate(names):
                pid = None if p.exists() else exited(root, r)
                if pid is not None:
                    raise CheckpointError(f"checkpoint of step {step}: rank {r}'s process (pid {pid}) "
                                          f"{EXITED_UNWRITTEN} of the checkpoint.")
        time.sleep(0.002)
    m = Manifest(step, meta.get("layout", {}), meta.get("config", {}), world_size)
    for rank, path in enumerate(names):
        frag = json.loads(path.read_text())
        m.files[frag["file"]] = {"sha256": frag["sha256"], "bytes": frag["bytes"]}
        m.ranks[rank] = {"file": frag["file"], "local": frag["local"]}
        for t in frag["tensors"]:
            entry = m.tensors.setdefault(t["name"], TensorEntry(tuple(t["shape"]), t["dtype"]))
            entry.pieces.append(Piece(frag["file"], t["key"], tuple(tuple(d) for d in t["box"])))
        path.unlink()
    for name, entry in m.tensors.items():
        mf.check_tiling(name, entry, str(folder))
    m.write(folder)
    final = step_dir(root, step)
    if final.exists():  # a save of this step from an earlier, resumed attempt
        shutil.rmtree(final)
    folder.rename(final)
    fsync_dir(root)
    atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((int(p.name[5:]), p) for p in root.glob("step-*") if p.name[5:].isdigit())
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# The writer's nice value: it yields the CPU to every training thread of the machine (the other
# ranks' included: a rank that staged first would otherwise write and hash while the others are
# still copying, and make them wait), and takes whatever CPU training leaves.
BACKGROUND_NICE = 10


def background_priority() -> None:
    """Lower the calling thread's priority to :data:`BACKGROUND_NICE` (Linux, where a nice value
    is a thread's own; threads it starts inherit it: the SHA-256 thread). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except OSError:  # not permitted in some sandboxes: the writer runs at normal priority
            pass


class CheckpointSaver:
    """Saves with at most one in flight. ``asynchronous``: :meth:`save` returns once the shards
    are on the host; the writing and the commit run on a thread, and their failure is raised by
    the next :meth:`save` or :meth:`wait` (so it cannot pass unnoticed)."""

    def __init__(self, root: Path, rank: int, world_size: int, barrier: Callable[[], None], keep: int = 0,
                 asynchronous: bool = True, timeout_s: float = 600.0) -> None:
        self.root, self.rank, self.world_size, self.barrier = Path(root), rank, world_size, barrier
        self.keep, self.asynchronous, self.timeout_s = keep, asynchronous, timeout_s
        self._worker: threading.Thread | None = None  # the background writer, started by the first async save
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._pending: dict[str, Any] | None = None
        self._buffer = HostBuffer()  # reused by every save: at most one is in flight
        self._last_step: int | None = None
        self.last_blocked_s = 0.0
        self.memo: dict[str, Any] = {}  # what the caller computes once per run (session.py: the holdings walk)

    def save(self, step: int, shards: Iterable[Shard], local: dict[str, torch.Tensor],
             meta: dict[str, Any]) -> dict[str, Any] | None:
        """Start (or, synchronously, do) the save of ``step``; returns the previous save's record
        if it completed just now."""
        done = self.wait()
        if step == self._last_step:  # e.g. a preemption right after the periodic save: nothing new
            return done
        t0 = time.perf_counter()
        # the first save's folder needs the barrier; later ones need none, so an asynchronous save
        # leaves creating it to the writer thread: no file-system call while training waits
        first, self._last_step = self._last_step is None, step
        later = not first and self.asynchronous
        folder = _partial_dir(self.root, step) if later else begin(self.root, step, self.rank, self.barrier, first)
        staged = stage(shards, local, self._buffer)
        if self.asynchronous:
            self._submit(folder, step, staged, meta, later)
        blocked = self.last_blocked_s = time.perf_counter() - t0
        self._pending = {"step": step, "blocked_s": blocked, "t0": t0}
        if not self.asynchronous:
            write_rank(folder, self.rank, staged)
            if self.rank == 0:  # waits for every rank's fragment
                commit(self.root, step, self.world_size, meta, self.keep, self.timeout_s)
            self.barrier()
            return self._finish() if done is None else done
        return done

    def _submit(self, *job: Any) -> None:
        """Hand ``job`` to the writer thread. The thread is started once and then waits for work:
        starting one per save made training wait until the new thread had run (under load,
        10-15 ms of a 20 ms blocked time, measured), a queue hand-off does not."""
        self._idle.clear()
        self._jobs.put(job)
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="checkpoint-writer", daemon=True)
            self._worker.start()

    def _serve(self) -> None:
        background_priority()
        while True:
            self._run(*self._jobs.get())
            self._idle.set()

    def _run(self, folder: Path, step: int, staged: Staged, meta: dict[str, Any], create: bool) -> None:
        try:
            if create:  # a later save's folder (no barrier: see :func:`begin`)
                begin(self.root, step, self.rank, self.barrier, first=False)
            write_rank(folder, self.rank, staged)
            if self.rank == 0:
                commit(self.root, step, self.world_size, meta, self.keep, self.timeout_s)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._error = e

    def poll(self) -> dict[str, Any] | None:
        """The record of a save that has completed since the last call (None otherwise)."""
        if self._pending is None or not self._idle.is_set():
            return None
        return self.wait()

    def wait(self) -> dict[str, Any] | None:
        """Block until the save in flight (if any) is complete; raise if it failed."""
        self._idle.wait()
        if self._error is not None:
            err, self._error, self._pending = self._error, None, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"writing the checkpoint failed on rank {self.rank}: {err!r}") from err
        return self._finish() if self._pending is not None else None

    def _finish(self) -> dict[str, Any]:
        assert self._pending is not None
        p, self._pending = self._pending, None
        return {"step": p["step"], "blocked_s": p["blocked_s"], "total_s": time.perf_counter() - p["t0"]}


def verify(folder: Path, m: Manifest) -> None:
    """Every file the manifest lists is present and has its recorded SHA-256."""
    for name, info in m.files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing.")
        if path.stat().st_size != info.get("bytes", path.stat().st_size):
            raise CheckpointError(f"checkpoint {folder}: {name} is truncated ({path.stat().st_size} of "
                                  f"{info['bytes']} bytes).")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} is corrupted (SHA-256 {digest[:12]}... does not "
                                  f"match the recorded {info['sha256'][:12]}...).")


def candidates(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, the one ``latest`` names first, then newest first."""
    steps = sorted((int(p.name[5:]), p) for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit())
    order = [p for _, p in reversed(steps)]
    try:
        named = (root / LATEST).read_text().strip()
    except OSError:
        named = ""
    first = [p for p in order if p.name == named]
    return first + [p for p in order if p.name != named]


def find_valid(root: Path) -> tuple[Path, Manifest, list[str]]:
    """The newest checkpoint that reads and verifies, and a note for each one passed over."""
    notes: list[str] = []
    for folder in candidates(root):
        try:
            m = mf.read(folder)
            verify(folder, m)
            return folder, m, notes
        except CheckpointError as e:
            notes.append(str(e))
    detail = (" Passed over: " + " ".join(notes)) if notes else ""
    raise CheckpointError(f"no valid checkpoint under {root}.{detail}")


class CheckpointReader:
    """Reads boxes of the tensors of one verified checkpoint; counts the bytes it reads."""

    def __init__(self, folder: Path, m: Manifest) -> None:
        self.folder, self.manifest = Path(folder), m
        self._files: dict[str, Any] = {}
        self.bytes_read = 0

    def _open(self, file: str) -> Any:
        from safetensors import SafetensorError, safe_open

        if file not in self._files:
            path = self.folder / mf.safe_file_name(file, str(self.folder))
            try:
                self._files[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"checkpoint {self.folder}: {file} is not a readable safetensors file "
                                      f"({e}); nothing in it was loaded or executed.") from None
        return self._files[file]

    def has(self, name: str) -> bool:
        return name in self.manifest.tensors

    def fill(self, name: str, box: Box, out: torch.Tensor) -> None:
        """Copy the elements of ``name`` inside ``box`` into ``out`` (shaped like the box)."""
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {self.folder} has no tensor {name!r}.")
        if tuple(out.shape) != lengths(box):
            raise CheckpointError(f"{name}: asked for a box of {lengths(box)} into a tensor of {tuple(out.shape)}.")
        covered = 0
        for piece in entry.pieces:
            common = intersect(piece.box, box)
            if common is None:
                continue
            handle = self._open(piece.file)
            try:
                sl = handle.get_slice(piece.key)
            except Exception:  # noqa: BLE001 - safetensors raises its own types
                raise CheckpointError(f"checkpoint {self.folder}: {piece.file} has no tensor {piece.key!r}.") \
                    from None
            if tuple(sl.get_shape()) != lengths(piece.box):
                raise CheckpointError(f"checkpoint {self.folder}: {piece.file}: {piece.key!r} has shape "
                                      f"{sl.get_shape()}, the manifest says {list(lengths(piece.box))}.")
            src = tuple(slice(o, o + n) for o, n in relative(common, piece.box))
            dst = tuple(slice(o, o + n) for o, n in relative(common, box))
            data = sl[src] if src else handle.get_tensor(piece.key)  # a scalar: no slicing
            (out[dst] if dst else out).copy_(data)
            self.bytes_read += data.numel() * data.element_size()
            covered += numel(common)
        if covered != numel(box):
            raise CheckpointError(f"checkpoint {self.folder}: tensor {name!r} lacks {numel(box) - covered} of the "
                                  f"elements of box {box}.")

    def local(self, rank: int) -> dict[str, torch.Tensor]:
        """The rank-local tensors (RNG states) rank ``rank`` saved."""
        info = self.manifest.ranks.get(rank)
        if info is None:
            return {}
        handle = self._open(info["file"])
        return {k: handle.get_tensor(f"rank/{k}") for k in info.get("local", [])}
