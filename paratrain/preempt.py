"""Preemption: a signal (SIGTERM from a scheduler, Ctrl-C's SIGINT) stops a run *between* steps,
after a checkpoint of the last finished step, instead of killing it mid-step.

Each rank's handler only records the signal. After every step the ranks agree on it with one
4-byte all-reduce (max) over the whole mesh -- ranks may see a signal a step apart, and the save is
collective, so each must decide at the same step -- then save synchronously and raise
:class:`Preempted`. The launcher forwards the signal to the ranks and gives them torch-elastic's
grace period (30 s) before it kills them, so the step in flight plus the save must fit in it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from paratrain.launch import Interrupted

SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
# Ctrl-C in a terminal signals every process of the foreground group, the ranks included, and torch's
# launcher then passes the signal it got on to the ranks: the same request arrives twice, within
# milliseconds. A repeat of the same signal this soon is that echo, not a second, impatient Ctrl-C.
ECHO_S = 2.0


class Preempted(Interrupted):
    """Stopped by ``signum`` after step ``step``, a checkpoint of which is in ``folder`` (or None)."""

    def __init__(self, signum: int, step: int, folder: str | None) -> None:
        super().__init__(signum)
        self.step, self.folder = step, folder


class StopRequest:
    """The signal this process got (0: none), recorded by :meth:`install`'s handlers while
    :attr:`armed` (inside the training loop, where the next step boundary is near). Unarmed (set-up,
    shutdown), or at a second signal (not the same one echoed within ``ECHO_S``), the process
    ends at once with ``128 + signum``: a rank the
    launcher stops because a peer died must not linger until torch-elastic's grace period ends.
    Armed, the step boundary must come within ``deadline_s`` of the signal (the run's collective
    ``--timeout``: a step that takes longer is stuck, e.g. on a peer that hangs); if it does not, the
    process ends then too, instead of when the launcher's grace period ends."""

    def __init__(self, deadline_s: float | None = None) -> None:
        self.signum = 0
        self.armed = False
        self.deadline_s = deadline_s
        self._deadline: threading.Timer | None = None
        self._at = 0.0  # when the signal came (time.monotonic)

    def install(self) -> Callable[[], None]:
        """Record SIGTERM/SIGINT/SIGHUP instead of dying of them; returns the undo. Outside the
        main thread (where Python cannot set handlers) it does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        sigs = [getattr(signal, n) for n in SIGNALS if hasattr(signal, n)]
        old = {s: signal.getsignal(s) for s in sigs}

        def record(signum: int, frame: Any) -> None:
            now = time.monotonic()
            if self.armed and signum == self.signum and now - self._at < ECHO_S:
                return  # the launcher's echo of the terminal's signal (ECHO_S)
            if not self.armed or self.signum:
                from paratrain.rank import end_process

                end_process(128 + signum)
            self.signum, self._at = signum, now
            if self.deadline_s is not None:
                self._deadline = threading.Timer(self.deadline_s, self._overdue, (signum,))
                self._deadline.daemon = True
                self._deadline.start()

        for s in sigs:
            signal.signal(s, record)

        def undo() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return undo

    def agreed(self, mesh: Any) -> int:
        """The signal any rank of ``mesh`` got (the same answer on every rank; collective)."""
        import torch

        from paratrain import comm

        flag = torch.tensor([self.signum], dtype=torch.int32)
        comm.all_reduce(flag, mesh.world, op="max", tag="control")
        if self._deadline is not None:  # the step boundary came in time: the save has no deadline
            self._deadline.cancel()
        return int(flag.item())

    def _overdue(self, signum: int) -> None:
        import os
        import sys

        from paratrain.rank import end_process

        print(f"paratrain rank {os.environ.get('RANK', '?')}: {signal.Signals(signum).name} came "
              f"{self.deadline_s:g} s ago and the step in flight has not ended (--timeout); stopping now.",
              file=sys.stderr)
        end_process(128 + signum)
