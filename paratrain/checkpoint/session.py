"""Saving and restoring one rank's training session (model, optimizer, RNG, step).

The data position and the learning-rate schedule position are the step itself: the global batch
of step ``k`` is a function of ``(seed, k)`` (``paratrain.data.get_batch``) and the learning rate
of ``(k, config)``, so a run resumed after step ``N`` trains on exactly the batches and learning
rates an uninterrupted run would. The RNG states (dropout) are restored when the layout is the
one that saved them; in another layout the dropout streams differ by construction (they follow
the dp and pp coordinates) and are seeded afresh.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from paratrain.checkpoint import holdings as hd
from paratrain.checkpoint.manifest import Manifest
from paratrain.checkpoint.store import CheckpointReader, CheckpointSaver


def layout_json(layout: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(layout).items()}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state(device)
    return out


def save(saver: CheckpointSaver, session: Any, step: int, config: dict[str, Any]) -> dict[str, Any] | None:
    """Save ``session`` (a :class:`paratrain.train.Session`) after ``step``; returns the record of a
    previous asynchronous save that completed meanwhile (see :class:`CheckpointSaver`)."""
    writes = saver.memo.setdefault("writes", hd.WriteSet())  # the holdings walk, once per run
    if getattr(session, "corpus", None) is not None:  # the library API saves a model without our loader
        config = dict(config, data_position=data_position(session, step))
    layout = saver.memo.get("layout")
    if layout is None or layout[0] is not session.cfg.layout:  # a frozen Layout: the same object, the same JSON
        layout = saver.memo["layout"] = (session.cfg.layout, layout_json(session.cfg.layout))
    meta = {"layout": layout[1], "config": config}
    shards = writes.shards(session.pm, session.opt, session.mesh.rank)
    return saver.save(step, shards, rng_state(session.device), meta)


def data_position(session: Any, step: int) -> dict[str, Any]:
    """Where the data stands after ``step``: the next step draws the global batch of ``(seed, step + 1)``
    from the corpus named by ``fingerprint`` (its index's CRC for a prepared folder); a resume checks it."""
    from paratrain.data import CorpusCheck

    cfg = session.cfg
    check = CorpusCheck.of(session.corpus)
    return {"source": check.source, "fingerprint": check.crc32, "next_step": step + 1,
            "tokens_seen": step * cfg.global_batch * cfg.seq_len}


def load(session: Any, folder: Path, m: Manifest) -> int:
    """Fill ``session`` from a verified checkpoint of any layout; returns the bytes this rank read."""
    reader = CheckpointReader(folder, m)
    hd.load(hd.holdings(session.pm, session.opt), session.opt, reader)
    # the same layout restores the RNG streams too (records written before cp existed have no "cp": 1)
    if {"cp": 1, **m.layout} == layout_json(session.cfg.layout) and m.world_size == session.mesh.shape.world_size:
        local = reader.local(session.mesh.rank)
        if "cpu_rng" in local:
            torch.set_rng_state(local["cpu_rng"])
        if "cuda_rng" in local and session.device.type == "cuda":
            torch.cuda.set_rng_state(local["cuda_rng"], session.device)
    return reader.bytes_read


class RunCheckpoints:
    """The checkpoints of one training run, as the loop uses them: restore at the start, a save
    every ``checkpoint_every`` steps and at the end, each save's record in ``metrics.jsonl``."""

    def __init__(self, session: Any, out: Path | None, config: dict[str, Any]) -> None:
        import torch.distributed as dist

        cfg = session.cfg
        self.session, self.config = session, config
        self.every = cfg.checkpoint_every
        self.final = cfg.checkpoint
        self.saver = None
        if out is not None and (cfg.checkpoint or cfg.checkpoint_every):
            barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
            self.saver = CheckpointSaver(out / "checkpoints", session.mesh.rank, session.mesh.shape.world_size,
                                         barrier, cfg.keep_checkpoints, cfg.async_checkpoint, cfg.timeout_s * 5)
        self.bytes_read = 0

    def restore(self) -> int:
        """Load ``cfg.resume_from`` (or ``cfg.init_from``, weights only); the first step to run."""
        from paratrain.checkpoint import manifest as mf

        cfg = self.session.cfg
        if cfg.resume_from:
            folder = Path(cfg.resume_from)
            m = mf.read(folder)
            self.bytes_read = load(self.session, folder, m)
            return m.step + 1
        return 1

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        """Save when due (not at the last step: :meth:`close` does) and report a finished save."""
        done = None
        if self.saver is not None:
            due = self.every and step % self.every == 0 and step < self.session.cfg.steps
            if due and not record.get("skipped"):  # a skipped step's weights are the last good ones anyway
                done = save(self.saver, self.session, step, self.config)
                record["checkpoint_blocked_s"] = self.saver.last_blocked_s
            else:
                done = self.saver.poll()
        if done is not None:  # a save finished: its blocked and total seconds
            record["checkpoint"] = done

    def save_now(self, step: int) -> str | None:
        """A synchronous save of ``step`` (after the one in flight); its folder, None without saver."""
        if self.saver is None:
            return None
        self.saver.wait()
        sync, self.saver.asynchronous = self.saver.asynchronous, False
        try:
            save(self.saver, self.session, step, self.config)
        finally:
            self.saver.asynchronous = sync
        return str(self.saver.root / f"step-{step}")

    def close(self, step: int, final: bool = True) -> dict[str, Any] | None:
        """The final checkpoint (if on and ``final``), then wait for every save; the last save's record."""
        if self.saver is None:
            return None
        done = self.saver.wait()
        if self.final and final:
            save(self.saver, self.session, step, self.config)
            done = self.saver.wait()
        return done
