"""The one table format every benchmark prints: what was measured, the figure, a note."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(title: str, rows: Sequence[tuple[str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    print(f"\n{title}")
    print("-" * min(100, sum(widths) + 40))
    for what, figure, note in rows:
        print(f"  {what.ljust(widths[0])}  {figure.rjust(widths[1])}  {note}".rstrip())
    print(flush=True)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]
