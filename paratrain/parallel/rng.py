"""Dropout randomness under tensor parallelism: which masks must agree across tp ranks, and which
must not.

* **Replicated regions** — a tensor every tp rank holds in full (without sequence parallelism:
  the residual stream, so ``drop``, ``attn.resid_drop``, ``mlp.drop``): the mask must be the
  **same** on every tp rank, or the copies diverge. These dropouts draw from the process's
  default generator, exactly as in the reference. It is the same on all tp ranks because every
  rank seeds it the same way (:func:`seed_default_generator`, from the run's seed and the rank's
  dp and pp indices — not its tp index) and every tp rank draws the same numbers from it in the
  same order (they run the same forward).
* **Sharded regions** — this rank's attention heads (``attn.attend``), and under sequence
  parallelism its slice of the sequence: the mask must **differ** between tp ranks, or the
  shards' masks are copies of each other. :meth:`ShardedRNG.fork` draws one number ``s`` from
  the default generator (the same ``s`` on every tp rank) and runs the block with the default
  generator re-seeded from ``(s, tp index)``; on exit it restores the generator's state exactly,
  so the only trace it leaves is the one draw, which every tp rank made.

Because the sharded seed is a function of the default generator's state, anything that replays
a forward by restoring that state — activation recomputation with ``torch.utils.checkpoint`` —
draws the same masks again. (A stream that kept its own advancing state would not be replayed.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from integers and labels, stable across runs and machines (unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_default_generator(seed: int, dp_index: int, pp_index: int) -> None:
    """Seed the default generators (CPU and CUDA) the same way on every rank of a tp group:
    the stream of the replicated regions. Data-parallel replicas (different data) and pipeline
    stages (different layers) get different streams."""
    torch.manual_seed(derive_seed(seed, "dropout", dp_index, pp_index))


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class ShardedRNG:
    """The random stream of the sharded regions of tp rank ``tp_index`` on ``device``."""

    def __init__(self, tp_index: int, device: torch.device | str = "cpu") -> None:
        self.tp_index = tp_index
        self.device = torch.device(device)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Inside the block, the device's default generator is seeded from (one draw of the
        default CPU generator, tp index); afterwards it is exactly as before the block."""
        draw = int(torch.randint(0, 2**62, (1,)).item())  # equal on every tp rank
        gen = _default_generator(self.device)
        saved = gen.get_state()
        gen.manual_seed(derive_seed(draw, "tp", self.tp_index))
        try:
            yield
        finally:
            gen.set_state(saved)

    def wrap(self, fn: Callable[..., Any], module: nn.Module, p_attr: str = "p") -> Callable[..., Any]:
        """``fn`` (a dropout's ``forward``, or attention's ``attend``) drawing from this stream
        whenever ``module`` is training with ``getattr(module, p_attr) > 0`` (otherwise there is
        nothing random to draw, and ``fn`` runs as it is)."""

        @functools.wraps(fn)
        def on_sharded_stream(*args: Any, **kwargs: Any) -> Any:
            if not module.training or getattr(module, p_attr) == 0:
                return fn(*args, **kwargs)
            with self.fork():
                return fn(*args, **kwargs)

        return on_sharded_stream
