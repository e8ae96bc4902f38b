"""A benchmark figure over repeated rounds, and its ratio against the reference config.

Every figure says which way is better. Ratios are oriented so that x > 1 is always better than the
reference: config / reference where higher is better (tokens/s, KV tokens, requests/s), reference /
config where lower is better (ms, seconds, MiB). `best` is the max of a higher-is-better figure and
the min of a lower-is-better one.
"""

from __future__ import annotations

import statistics

HIGHER, LOWER = "higher", "lower"


def summarize(values: list[float | None]) -> dict | None:
    """Figures of the rounds that produced one -> {"min", "median", "max", "n", "values"}; None if none."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return None
    return {"min": min(got), "median": statistics.median(got), "max": max(got), "n": len(got), "values": got}


def best(summary: dict, better: str) -> float:
    return summary["max"] if better == HIGHER else summary["min"]


def ratio(value: float | None, reference: float | None, better: str) -> float | None:
    """x against the reference, > 1 = better; None when either is missing or not positive."""
    if better not in (HIGHER, LOWER):
        raise ValueError(f"better must be {HIGHER!r} or {LOWER!r}, got {better!r}")
    if value is None or reference is None or value <= 0 or reference <= 0:
        return None
    return value / reference if better == HIGHER else reference / value


def ratios(summary: dict | None, reference: dict | None, better: str) -> dict | None:
    """{"median": x of the medians, "best": x of the best rounds}; None without both summaries."""
    if summary is None or reference is None:
        return None
    return {
        "median": ratio(summary["median"], reference["median"], better),
        "best": ratio(best(summary, better), best(reference, better), better),
    }


def cell(summary: dict | None, spec: str) -> str:
    """A table cell: the median, and the min in parentheses when rounds disagree."""
    if summary is None:
        return "-"
    text = f"{summary['median']:{spec}}"
    return text if summary["min"] == summary["max"] else f"{text} ({summary['min']:{spec}})"


def x_cell(x: dict | None) -> str:
    return "-" if x is None or x["median"] is None else f"{x['median']:.2f}"
