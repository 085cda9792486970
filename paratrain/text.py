"""Plain-text tables, shared by the runtime's output (:mod:`paratrain.metrics`, ``paratrain
bench``) and the planner's (:mod:`paratrain.plan.report`). Standard library only: the planner
imports it without torch."""

from __future__ import annotations


def format_grid(header: list[str], rows: list[list[str]]) -> str:
    """A column-aligned text table (first column left-aligned, the rest right-aligned)."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells: list[str]) -> str:
        out = [f"{cells[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])
