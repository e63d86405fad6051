"""Statistics over seeds, shared by the VQA and the sentence experiments.

Plain numbers in, plain dicts out: a statistic is ``{"mean", "std", "n"}`` (sample std, ddof = 1),
a paired test ``{"n", "mean_diff", "t_p", "wilcoxon_p"}``. NaN marks "no value" (JSON writes it
as null; :func:`vqa_align.experiments.results.restore_nan` reads it back).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Stat = dict[str, float | int]  # {"mean": float, "std": float, "n": int}


@dataclass(frozen=True)
class Metric:
    """One measured quantity of a report: where it is, its label, which direction is better, format."""

    key: str  # VQA: a key of the flat per-run metrics; sentences: a "/"-separated path in a run result
    label: str
    higher_is_better: bool | None  # None: no "best" (e.g. parameter counts)
    digits: int = 2
    kind: str = "number"  # "number" | "count" (parameters: 1.23M)


def mean_std(values: Iterable[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Stat]]:
    """{method: {metric: mean_std}} from runs ``{"method": str, "metrics": {metric: float}}``."""
    by_method: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run["metrics"])
    out: dict[str, dict[str, Stat]] = {}
    for method, metrics in by_method.items():
        keys = list(dict.fromkeys(k for m in metrics for k in m))
        out[method] = {k: mean_std(m.get(k) for m in metrics) for k in keys}
    return out


def clear_difference(a: Stat, b: Stat) -> bool | None:
    """Does |mean_a − mean_b| exceed the larger of the two stds? None when a std is unknown (n < 2).

    A heuristic, stated as such in the report: with three seeds no test has much power."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return abs(a["mean"] - b["mean"]) > max(a["std"], b["std"])


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """Aligned (a) minus baseline (b) over paired seeds: mean difference, paired t and Wilcoxon p
    (two-sided, scipy). With 5 pairs the smallest Wilcoxon p is 0.0625."""
    import numpy as np
    from scipy import stats

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out: dict[str, float | int] = {"n": int(len(diff)), "mean_diff": float(diff.mean()) if len(diff) else math.nan,
                                   "t_p": math.nan, "wilcoxon_p": math.nan}
    # Differences equal up to rounding (e.g. 4 points in every pair of 100-sentence sets) have no
    # variance: the t statistic is infinite and says nothing; report no p-value then.
    spread = float(np.ptp(diff)) if len(diff) else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(diff) >= 2 and spread > 1e-9 * max(1.0, abs(float(diff.mean()))):
            out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
        if len(diff) >= 2 and np.any(np.abs(diff) > 1e-12):
            out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return out
