"""Imported first by the server that :func:`paratrain.launch.prestart` starts, ranks are forked from.

The server reports each rank's exit code to the launcher, so it must outlive the ranks: a signal
sent to the whole process group (Ctrl-C in a terminal, a scheduler's SIGTERM to every process of
the job) must reach the ranks and the launcher, not end the server (the launcher would then read
every rank's exit code as 255). multiprocessing's server already ignores SIGINT; this module makes
it ignore the others the launcher handles. It ends when the launcher does (multiprocessing closes
it when its pipe to the launcher closes). A forked rank restores the default handlers first thing
(:func:`paratrain.rank.forked_main`), so the ranks take these signals as fresh processes would.
Importing this module anywhere else would do the same to that process: only the server does.
"""

from __future__ import annotations

import signal
import sys

from paratrain.rank import SHIELDED

# The server is ``python -c 'from multiprocessing.forkserver import main; main(...)'``: anywhere
# else (an import by mistake) this module does nothing.
if sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    for _name in SHIELDED:
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
