"""Text for people: a time in its unit, and a table aligned in columns or in Markdown (the
profiler's reports and ``gpunet bench`` print both through these)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any


def seconds(s: float | None) -> str:
    """3 significant digits in s, ms, us or ns; "-" for no time (None, inf, NaN)."""
    if s is None or not math.isfinite(s):
        return "-"
    if s == 0.0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def table(
    head: Sequence[str],
    body: Sequence[Sequence[Any]],
    *,
    markdown: bool = False,
    right: Collection[int] | None = None,
    group: int = 0,
) -> str:
    """Rows under a header: columns aligned (``right``: the right-aligned ones, default all
    but the first) with a rule under the header, or a Markdown table. ``group`` > 0 puts a
    blank line wherever the first ``group`` cells change (aligned text only)."""
    cells = [[str(c) for c in row] for row in [head, *body]]
    n = len(head)
    right = set(range(1, n)) if right is None else set(right)
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        rule = ["---:" if i in right else "---" for i in range(n)]
        lines.insert(1, "| " + " | ".join(rule) + " |")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(n)]

    def line(row: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        )
        return "  ".join(padded).rstrip()

    lines = [line(cells[0]), line(["-" * w for w in widths])]
    prev = None
    for row in cells[1:]:
        if group and prev is not None and row[:group] != prev:
            lines.append("")
        prev = row[:group]
        lines.append(line(row))
    return "\n".join(lines)
