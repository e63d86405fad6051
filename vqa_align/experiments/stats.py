"""Statistics over seeds, shared by the VQA and the sentence experiments.

Plain numbers in, plain dicts out: a statistic is ``{"mean", "std", "n"}`` (sample std, ddof = 1),
a paired test ``{"n", "mean_diff", "t_p", "wilcoxon_p"}`` (plus ``t_p_holm`` / ``wilcoxon_p_holm``
once adjusted over its family by :func:`adjust_family`). NaN marks "no value" (JSON writes it
as null; :func:`vqa_align.experiments.results.restore_nan` reads it back).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vqa_align.errors import UserError

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


# ----------------------------------------------------------------------------------------------
# Many tests at once: Holm's correction, verdicts, seed sets
# ----------------------------------------------------------------------------------------------

SIGNIFICANCE = 0.05  # family-wise error rate of the verdicts (after Holm's correction)
MIN_PAIRS = 3  # seeds both methods have, before a verdict is given (1 degree of freedom decides nothing)
HOLM_SUFFIX = "_holm"  # a paired test's "t_p" adjusted over its family is stored as "t_p_holm"
ADJUSTED = ("t_p", "wilcoxon_p")  # the p-values of a paired test that are adjusted


def _finite(p: float | None) -> bool:
    return p is not None and math.isfinite(p)


def holm(p_values: Sequence[float | None]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted value of p_(i) is
    max over j <= i of min(1, (m - j + 1) · p_(j)): rejecting where it is below α controls the
    chance of any false "better"/"worse" among the m tests at α, whatever their dependence. A
    missing p (None or NaN: no test was possible) stays NaN and does not count in m."""
    present = [i for i, p in enumerate(p_values) if _finite(p)]
    m = len(present)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(present, key=lambda i: p_values[i])):  # type: ignore[arg-type, return-value]
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # type: ignore[operator]
        out[i] = running
    return out


def adjust_family(tests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each paired test with its ``<p>_holm`` added (Holm over all of ``tests``: one family) and
    the family size ``holm_m`` (the tests that have a p-value)."""
    out = {key: dict(test) for key, test in tests.items()}
    for name in ADJUSTED:
        raw = [test.get(name) for test in tests.values()]
        for test, adjusted in zip(out.values(), holm(raw)):
            test[name + HOLM_SUFFIX] = adjusted
            test[f"holm_m_{name}"] = sum(_finite(p) for p in raw)
    return out


def compare_to_baseline(values: dict[int, dict[str, float | None]], baseline: dict[int, dict[str, float | None]],
                        keys: Sequence[str], seeds: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """Paired tests of one method against the baseline over the seeds both have (only ``seeds``
    when given), one per key, Holm-adjusted as one family. ``values``: {seed: {key: number}}."""
    chosen = set(values) & set(baseline) if seeds is None else set(values) & set(baseline) & set(seeds)
    tests = {}
    for key in keys:
        pairs = [(values[s].get(key), baseline[s].get(key)) for s in sorted(chosen)]
        pairs = [(a, b) for a, b in pairs if _finite(a) and _finite(b)]
        tests[key] = paired_test([a for a, _ in pairs], [b for _, b in pairs])
    return adjust_family(tests)


def verdict(test: dict[str, Any], higher_is_better: bool | None) -> str:
    """'better' / 'worse' when the Holm-adjusted paired t-test p (``t_p_holm``) is below
    SIGNIFICANCE (direction by the metric), else 'no clear difference'; fewer than MIN_PAIRS
    pairs: 'too few pairs'. The raw p never decides: it is one of many tests."""
    if test.get("n", 0) < MIN_PAIRS:
        return "too few pairs"
    adjusted = test.get("t_p" + HOLM_SUFFIX)
    if not _finite(adjusted) or adjusted >= SIGNIFICANCE or higher_is_better is None:
        return "no clear difference"
    return "better" if (test["mean_diff"] > 0) == higher_is_better else "worse"


def seed_sets(seeds: Sequence[int], roles: dict[str, Sequence[int]] | None) -> list[tuple[str, list[int]]]:
    """The seed sets a report tests separately: all seeds, then (when the experiment declares
    them) the exploratory and the confirmatory seeds. ``roles``: {"exploratory": [...],
    "confirmatory": [...]}; a seed named there that did not run is left out of its set."""
    sets = [("all", sorted(seeds))]
    for role in ("exploratory", "confirmatory"):
        chosen = sorted(set((roles or {}).get(role) or []) & set(seeds))
        if chosen:
            sets.append((role, chosen))
    return sets


def check_seed_roles(roles: dict[str, Sequence[int]] | None, where: str, seeds: Sequence[int] | None = None) -> None:
    """Exploratory and confirmatory seeds must not overlap (a seed that suggested an effect cannot
    confirm it) and, given ``seeds``, must be among them; errors name ``where`` (field or file)."""
    if not roles:
        return
    unknown = set(roles) - {"exploratory", "confirmatory", "note"}
    if unknown:
        raise UserError(f"{where}: unknown seed role(s) {sorted(unknown)}; use exploratory / confirmatory")
    both = set(roles.get("exploratory") or []) & set(roles.get("confirmatory") or [])
    if both:
        raise UserError(f"{where}: seeds {sorted(both)} are both exploratory and confirmatory")
    named = set(roles.get("exploratory") or []) | set(roles.get("confirmatory") or [])
    if seeds is not None and named - set(seeds):
        raise UserError(f"{where}: seeds {sorted(named - set(seeds))} have a role but are not among the seeds "
                        f"{list(seeds)}")


# ----------------------------------------------------------------------------------------------
# The same tests in both reports' markdown
# ----------------------------------------------------------------------------------------------

FAMILY_TEXT = ("Holm family: all tests of one method against `{baseline}` over one seed set in this report (every "
               "metric of its table that has a p-value; the family size is given per table); the verdict is "
               "`better` / `worse` when the Holm-adjusted t-test p < {alpha}, else `no clear difference` (fewer "
               "than {pairs} pairs: `too few pairs`). Raw p-values are shown beside the adjusted ones for "
               "reference only: each is one of many tests.")


def family_text(baseline: str) -> str:
    """How the report's p-values are adjusted and its verdicts decided (one sentence block)."""
    return FAMILY_TEXT.format(baseline=baseline, alpha=SIGNIFICANCE, pairs=MIN_PAIRS)


def format_p(value: float | None) -> str:
    return "–" if not _finite(value) else f"{value:.3f}"


def tests_table(tests: dict[str, dict[str, Any]], metrics: Sequence[Metric]) -> list[str]:
    """Markdown table of one method's paired tests: n, Δ, raw and Holm-adjusted p, verdict."""
    lines = ["| metric | n | Δ | t-test p | Holm t p | Wilcoxon p | Holm W p | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for metric in metrics:
        t = tests.get(metric.key)
        if not t or not t["n"]:
            continue
        lines.append(f"| {metric.label.replace(' ↓', '')} | {t['n']} | {t['mean_diff']:+.{metric.digits}f} | "
                     f"{format_p(t['t_p'])} | {format_p(t.get('t_p_holm'))} | {format_p(t['wilcoxon_p'])} | "
                     f"{format_p(t.get('wilcoxon_p_holm'))} | {verdict(t, metric.higher_is_better)} |")
    return lines


def family_size(tests: dict[str, dict[str, Any]]) -> int:
    """How many t-tests of one family had a p-value (Holm's m)."""
    return max((t.get("holm_m_t_p", 0) for t in tests.values()), default=0)


def seed_set_title(name: str, seeds: Sequence[int]) -> str:
    label = {"all": "all seeds", "exploratory": "exploratory seeds", "confirmatory": "confirmatory seeds"}[name]
    return f"{label} {', '.join(map(str, seeds))}"
