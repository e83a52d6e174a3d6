"""Rates with Wilson intervals, and the results rows every suite reports.

A results row is one number: suite, setting (`k=5`, `bias=-2`, `T=0.7,top_p=0.9,top_k=0`,
`policy=hate`, ...), metric, judge (or "" for a judge-free count), value, its 95% interval and n,
and the decoding it was measured under (`decode`: the top-level `decode:` settings that differ
from the defaults and that the suite does not override, e.g. `context=drop`; else `default`).
The report, results.json and `--compare` all read these rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

RESULTS = pa.schema(
    [
        ("model", pa.string()),
        ("decode", pa.string()),  # pipeline.decode.config.setting: `default`, `context=drop`, ...
        ("suite", pa.string()),
        ("setting", pa.string()),
        ("metric", pa.string()),
        ("judge", pa.string()),
        ("value", pa.float64()),
        ("low", pa.float64()),  # 95% interval (Wilson for rates; null for means)
        ("high", pa.float64()),
        ("n", pa.int64()),
    ]
)

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (sound at 0/n and n/n, unlike the normal
    approximation, which collapses to a point there)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(
    model: str, suite: str, setting: str, metric: str, judge: str, flags: Iterable[bool | None]
) -> dict[str, Any]:
    """A rate over flags; None flags (no verdict) are left out of n, not counted as either."""
    known = [bool(f) for f in flags if f is not None]
    hits = sum(known)
    low, high = wilson(hits, len(known))
    value = hits / len(known) if known else math.nan
    return _result(model, suite, setting, metric, judge, value, low, high, len(known))


def mean(
    model: str, suite: str, setting: str, metric: str, values: Iterable[float], judge: str = ""
) -> dict[str, Any]:
    vals = [float(v) for v in values]
    value = sum(vals) / len(vals) if vals else math.nan
    return _result(model, suite, setting, metric, judge, value, None, None, len(vals))


def _result(model, suite, setting, metric, judge, value, low, high, n) -> dict[str, Any]:
    """One RESULTS row."""
    return dict(
        model=model,
        suite=suite,
        setting=setting,
        metric=metric,
        judge=judge,
        value=value,
        low=low,
        high=high,
        n=n,
    )
