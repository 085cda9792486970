"""``--tensorboard``: the per-step records of ``metrics.jsonl`` also as TensorBoard scalars.

Written with the ``tensorboard`` package's own event-file writer and protocol buffers (``pip
install 'paratrain[data]'``), not ``torch.utils.tensorboard``: importing the writer takes 0.8 s
here against 5.8 s for ``torch.utils.tensorboard`` in a fresh process (docs/data.md). Each number
of a record becomes one scalar at ``global_step = record["step"]``, nested keys joined by ``/``
(``comm_bytes/dp``, ``checkpoint/blocked_s``); booleans are 0/1, other values are left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paratrain.errors import ConfigError

FOLDER = "tensorboard"
MISSING = ("--tensorboard needs the `tensorboard` package, which is not installed: pip install 'paratrain[data]' "
           "(or pip install tensorboard), or drop --tensorboard (metrics.jsonl has the same numbers).")


def check_available() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(MISSING)


def scalars(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number of a metrics record except the step itself."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if tag == "step":
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{tag}/")
        elif isinstance(value, (bool, int, float)):
            yield tag, float(value)


class TensorBoardMetrics:
    """A :class:`paratrain.metrics.MetricsWriter` that also writes each record to ``folder``."""

    def __init__(self, jsonl: Any, folder: Path) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise ConfigError(MISSING) from None
        self.jsonl, self.event_pb2, self.summary_pb2 = jsonl, event_pb2, summary_pb2
        folder.mkdir(parents=True, exist_ok=True)
        self.events = EventFileWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        values = [self.summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record)]
        event = self.event_pb2.Event(wall_time=time.time(), step=int(record["step"]),
                                     summary=self.summary_pb2.Summary(value=values))
        self.events.add_event(event)
        self.events.flush()  # like metrics.jsonl: a crash keeps every finished step

    def close(self) -> None:
        self.events.close()
        self.jsonl.close()
