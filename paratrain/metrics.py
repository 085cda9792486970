"""Run outputs: one JSON object per optimizer step in ``metrics.jsonl``, a progress display, and
the summary table printed at the end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import IO, Any

from paratrain.text import format_grid as format_grid  # re-exported: its old home, used by bench and scripts

NONFINITE_KEY = "nonfinite"  # lists the keys whose value was NaN or infinite (written as null)


def finite_json(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN/infinite float replaced by None (JSON has no NaN; ``json.dumps``
    would write the non-standard ``NaN``), and the dotted paths of the replaced values."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [path or "value"]
    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = finite_json(v, f"{path}.{k}" if path else str(k))
            bad += b
        return out, bad
    if isinstance(obj, (list, tuple)):
        items = [finite_json(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [b for _, bs in items for b in bs]
    return obj, []


def dumps_finite(obj: dict[str, Any], **kw: Any) -> str:
    """Strict JSON of ``obj``; non-finite numbers become null, listed under ``"nonfinite"``."""
    clean, bad = finite_json(obj)
    if bad:
        clean[NONFINITE_KEY] = bad
    return json.dumps(clean, allow_nan=False, default=str, **kw)


class MetricsWriter:
    """Appends one JSON line per record and flushes, so a crash keeps every finished step."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self._f: IO[str] = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(dumps_finite(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar on a terminal; on a pipe or log file, a plain line every ~5% of the run."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.total = total
        self.enabled = enabled
        self._bar = None
        self._every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)
        elif enabled:
            start = f", from step {initial + 1}" if initial else ""
            print(f"{desc}: {total} steps{start}", file=sys.stderr, flush=True)

    def update(self, step: int, **fields: float | str) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            self._bar.update(1)
        elif step % self._every == 0 or step == self.total or step == 1:
            body = "  ".join(f"{k} {v}" for k, v in text.items())
            print(f"step {step:>5}/{self.total}  {body}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_table(rows: list[tuple[str, str]], title: str = "") -> str:
    """Two aligned columns, for the end-of-run summary."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * max(len(title), 40)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
