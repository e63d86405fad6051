"""Holm's correction (experiments/stats.py): against a slow reference that runs the step-down
procedure itself, a hand-worked example, and the verdicts and seed sets built on it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vqa_align.errors import UserError
from vqa_align.experiments.stats import (
    adjust_family, check_seed_roles, compare_to_baseline, holm, seed_sets, verdict,
)


def holm_by_procedure(p_values: list[float]) -> list[float]:
    """The adjusted p of a hypothesis = the smallest level α at which Holm's step-down procedure
    rejects it (p sorted; reject p_(k) while p_(k) <= α / (m - k + 1), stop at the first that is
    not). Tries every candidate α = min(1, c · p_j) and α = 1: slow and obvious."""
    finite = [p for p in p_values if not math.isnan(p)]
    m = len(finite)
    candidates = sorted({min(1.0, c * p) for p in finite for c in range(1, m + 1)} | {1.0})
    out = []
    for p in p_values:
        if math.isnan(p):
            out.append(math.nan)
            continue
        for alpha in candidates:
            rejected = set()
            for k, q in enumerate(sorted(finite)):
                if q * (m - k) > alpha * (1 + 1e-12):  # p > α / (m − k), free of the division's rounding
                    break
                rejected.add(q)
            if p in rejected:
                out.append(alpha)
                break
        else:
            out.append(1.0)
    return out


def test_holm_by_hand() -> None:
    # m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005 = 0.02, 3·0.01 = 0.03, 2·0.03 = 0.06,
    # 1·0.04 = 0.04 raised to the running maximum 0.06; the missing p stays missing.
    assert holm([0.01, 0.04, 0.03, 0.005, math.nan, None]) == pytest.approx(
        [0.03, 0.06, 0.06, 0.02, math.nan, math.nan], nan_ok=True)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_holm_matches_the_step_down_procedure() -> None:
    rng = np.random.default_rng(0)
    for m in range(1, 9):
        for _ in range(25):
            p = rng.uniform(0, 0.2, m).round(3).tolist()  # rounding makes ties
            if m > 2:
                p[1] = math.nan
            assert holm(p) == pytest.approx(holm_by_procedure(p), nan_ok=True), p
    for p in itertools.product([0.001, 0.01, 0.2], repeat=3):  # exact ties
        assert holm(list(p)) == pytest.approx(holm_by_procedure(list(p)))


def test_verdict_uses_the_adjusted_p_of_its_family() -> None:
    a = [80.0, 81.0, 82.5, 79.0, 80.5]
    b = [79.0, 80.5, 81.0, 78.0, 80.0]
    values = {s: {"x": a[s], "noise": float(s % 2)} for s in range(5)}
    baseline = {s: {"x": b[s], "noise": float((s + 1) % 2)} for s in range(5)}
    alone = compare_to_baseline(values, baseline, ["x"])["x"]
    assert alone["t_p"] < 0.05 and alone["t_p_holm"] == alone["t_p"] and alone["holm_m_t_p"] == 1
    assert verdict(alone, True) == "better" and verdict(alone, False) == "worse"
    # The same test among others: the adjusted p is larger; a raw p of 0.01 in a family of 23
    # (Holm 0.23) is no verdict.
    family = adjust_family({"x": {**alone}, **{f"y{i}": {"n": 5, "mean_diff": 1.0, "t_p": 0.5, "wilcoxon_p": 0.5}
                                             for i in range(22)}})
    assert family["x"]["t_p_holm"] == pytest.approx(min(1.0, 23 * alone["t_p"]))
    raw_significant = {"n": 5, "mean_diff": 1.0, "t_p": 0.01, "t_p_holm": 0.23}
    assert verdict(raw_significant, True) == "no clear difference"
    assert verdict({"n": 2, "mean_diff": 1.0, "t_p": 0.0, "t_p_holm": 0.0}, True) == "too few pairs"
    assert verdict({"n": 5, "mean_diff": 1.0, "t_p": 0.001}, True) == "no clear difference"  # never adjusted


def test_seed_sets_and_roles() -> None:
    assert seed_sets([2, 0, 1], None) == [("all", [0, 1, 2])]
    roles = {"exploratory": [0, 1], "confirmatory": [2, 3]}
    assert seed_sets([0, 1, 2], roles) == [("all", [0, 1, 2]), ("exploratory", [0, 1]), ("confirmatory", [2])]
    check_seed_roles(roles, "x", [0, 1, 2, 3])
    with pytest.raises(UserError, match="both exploratory and confirmatory"):
        check_seed_roles({"exploratory": [0, 1], "confirmatory": [1]}, "run.confirmatory_seeds")
    with pytest.raises(UserError, match=r"seeds \[3\] have a role"):
        check_seed_roles(roles, "seed_roles", [0, 1, 2])
    with pytest.raises(UserError, match="unknown seed role"):
        check_seed_roles({"held_out": [1]}, "seed_roles")
