"""Which rank's failure ended a launch, and how it is reported (:class:`LaunchError`).

The launcher learns of a failure from torch's elastic agent (exit codes, for forked ranks only the
first exit it saw) and from the ranks themselves: each failing rank writes ``error-<rank>.json``
(``paratrain.rank``), a finished one ``rank-<rank>.pkl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LaunchError(RuntimeError):
    """A rank failed. ``rank``/``exitcode`` (None: not seen) of the first failure, its ``message`` and the
    Python ``traceback`` from inside the rank (empty if it died from a signal)."""

    def __init__(self, rank: int, exitcode: int | None, message: str, traceback: str = "",
                 others: dict[int, int] | None = None) -> None:
        self.rank, self.exitcode, self.message, self.traceback = rank, exitcode, message, traceback
        self.others = others or {}
        code = "exit code not seen" if exitcode is None else f"exit code {exitcode}"
        super().__init__(f"rank {rank} failed ({code}): {message}")


def _failure_details(failure: Any) -> tuple[str, str]:
    data = getattr(failure, "error_file_data", None) or {}
    msg = data.get("message", "") if isinstance(data, dict) else ""
    if isinstance(msg, dict):
        tb = msg.get("extraInfo", {}).get("py_callstack", "")
        text = msg.get("message", "")
        return text.strip(), tb
    if failure.exitcode < 0:
        try:
            sig = failure.signal_name()
        except Exception:  # noqa: BLE001 - a name is only a nicety
            sig = str(-failure.exitcode)
        return f"the process was killed by signal {sig} without raising a Python error", ""
    return str(getattr(failure, "message", "") or f"exit code {failure.exitcode}"), ""


# What a rank's collective raises when a peer process is gone (gloo; NCCL's bootstrap), and what rank
# 0's checkpoint commit raises when a rank exited without its file (paratrain.checkpoint.store's
# EXITED_UNWRITTEN): an error caused by another rank's death, never the first failure when a rank
# without an error of its own died.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "exited before writing its part")


def root_cause(e: Any, work_dir: Path, nproc: int | None = None) -> LaunchError:
    """The rank whose failure came first.

    A rank killed by a signal (SIGKILL from the OOM killer or a user) records no error; its peers
    then record "Connection reset by peer", perhaps before the launcher learns of the kill, and
    the launcher may only report one failed rank (forked ranks: the first exit it saw). So: a rank
    the launcher saw killed by a signal without an error file is it; else, if every recorded error
    is such a lost-peer error, the first rank that ended with neither an error nor a result (it
    died without a word); else the earliest error a rank recorded (see ``paratrain.rank``); else
    the launcher's own information."""
    import json

    codes = {r: f.exitcode for r, f in e.failures.items()}
    errors = [json.loads(p.read_text()) for p in work_dir.glob("error-*.json")]
    rank: int | None = None
    killed = [r for r, c in sorted(codes.items()) if c < 0 and not (work_dir / f"error-{r}.json").exists()]
    if killed:
        rank = killed[0]
    elif nproc and errors and all(any(m in x["message"] for m in _PEER_LOST) for x in errors):
        silent = [r for r in range(nproc) if not (work_dir / f"error-{r}.json").exists()
                  and not (work_dir / f"rank-{r}.pkl").exists()]
        rank = silent[0] if silent else None
    if rank is not None:
        others = {r: c for r, c in codes.items() if r != rank}
        if rank in codes:
            message, tb = _failure_details(e.failures[rank])
            return LaunchError(rank, codes[rank], message, tb, others)
        return LaunchError(rank, None, "the process ended without raising a Python error, and its peers then lost "
                           "their connection to it: it was killed (by a signal such as SIGKILL, which the "
                           "kernel's out-of-memory killer sends) or crashed in native code", "", others)
    if errors:
        first = min(errors, key=lambda x: x["time_ns"])
        rank = first["rank"]
        others = {r: c for r, c in codes.items() if r != rank}
        return LaunchError(rank, codes.get(rank, 1), first["message"], first["traceback"], others)
    rank, failure = e.get_first_failure()
    message, tb = _failure_details(failure)
    return LaunchError(rank, failure.exitcode, message, tb, {r: c for r, c in codes.items() if r != rank})
