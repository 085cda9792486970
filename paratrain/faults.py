"""Fault injection for tests of the launcher: a hook the training loop calls as each step starts.
Torch-free, so ``paratrain train`` parses ``PARATRAIN_FAULT`` before importing anything heavy."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from paratrain.errors import ConfigError

FAULT_ENV = "PARATRAIN_FAULT"

StepHook = Callable[[int, int], None]  # (global rank, step), called as each step starts


@dataclass(frozen=True)
class Fault:
    """Testing aid, a :data:`StepHook`: rank ``rank`` raises (``hang``: sleeps forever) at the
    start of step ``step``, to check that a failure ends the whole job promptly. From outside:
    ``PARATRAIN_FAULT=RANK:STEP[:hang]``, parsed once by ``paratrain train`` before it starts the
    ranks (:meth:`from_env`) and handed to each one's :func:`paratrain.train.train_worker`."""

    rank: int
    step: int
    hang: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Fault | None:
        spec = environ.get(FAULT_ENV)
        if not spec:
            return None
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]) or parts[2:] not in ([], ["hang"]):
            raise ConfigError(f"{FAULT_ENV}={spec!r} is not a fault: expected RANK:STEP or RANK:STEP:hang "
                              "(a global rank and a step, non-negative integers; e.g. 1:3), or unset it.")
        return cls(int(parts[0]), int(parts[1]), len(parts) == 3)

    def __call__(self, rank: int, step: int) -> None:
        if (rank, step) != (self.rank, self.step):
            return
        while self.hang:
            time.sleep(3600)
        raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_ENV}="
                           f"{self.rank}:{self.step}{':hang' if self.hang else ''})")
