"""Markdown tables for reports (the benchmark harness and the evaluator write the same kind).

``markdown_table(rows, columns, fmt)``: one row per dict, ``columns`` default to every key in
first-seen order (list and dict values are left to the JSON next to the table); ``fmt`` turns a value
into a cell (default :func:`format_value`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence


def format_value(v) -> str:
    """A compact cell: 3 significant digits for small/large floats, fixed decimals otherwise, yes/no, JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:g}"
        a = abs(v)
        return f"{v:.3g}" if a < 1e-2 or a >= 1e6 else (f"{v:.3f}" if a < 10 else f"{v:.1f}")
    if isinstance(v, list | tuple | dict):
        return json.dumps(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[dict], columns: Sequence[str] | None = None, fmt: Callable[[object], str] = format_value
) -> str:
    """A markdown table of ``rows`` (see the module docstring); ``"(no rows)"`` for none."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k, v in r.items() if k not in columns and not isinstance(v, list | dict)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["format_value", "markdown_table"]
