"""ECE, reliability diagram, PAvPU with MC-dropout t-tests, and feature noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vqa_align.metrics.calibration import (
    _student_t_sf_two_sided,
    calibration_table,
    expected_calibration_error,
    noise_features,
    pavpu,
    reliability_diagram,
    top2_ttest_pvalues,
)

# --- ECE ----------------------------------------------------------------------------------------


def test_ece_hand_computed_five_bins() -> None:
    conf = [0.1, 0.3, 0.35, 0.9, 0.95, 1.0]
    correct = [0.0, 1.0, 0.6, 1.0, 0.0, 1.0]
    # bins of width 0.2: (0,.2] -> {.1}: conf .1, acc 0;  (.2,.4] -> {.3,.35}: conf .325, acc .8;
    # (.8,1] -> {.9,.95,1}: conf .95, acc 2/3.  ECE = (1*.1 + 2*.475 + 3*(.95-2/3)) / 6 = 1.9/6
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(1.9 / 6, abs=1e-12)
    table = calibration_table(conf, correct, n_bins=5)
    assert table.count.tolist() == [1, 2, 0, 0, 3]
    assert table.confidence.tolist() == pytest.approx([0.1, 0.325, 0.0, 0.0, 0.95])
    assert table.accuracy.tolist() == pytest.approx([0.0, 0.8, 0.0, 0.0, 2 / 3])
    assert table.lower.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert table.as_dict()["count"] == [1, 2, 0, 0, 3]


def test_ece_fifteen_bins_and_bin_edges() -> None:
    # 1/15 = 0.0667: 0.05 -> bin 0, 0.5 -> bin 7 (0.4667, 0.5333], 0.99 -> bin 14
    ece = expected_calibration_error([0.05, 0.5, 0.99], [1.0, 0.3, 1.0])
    assert ece == pytest.approx((0.95 + 0.2 + 0.01) / 3, abs=1e-12)
    table = calibration_table([0.05, 0.5, 0.99], [1.0, 0.3, 1.0])
    assert np.flatnonzero(table.count).tolist() == [0, 7, 14]
    # right-closed bins: 0.2 belongs to (0, 0.2]; 0 goes to the first bin; 1 to the last
    table = calibration_table([0.0, 0.2, 0.2000001, 1.0], [0, 0, 0, 0], n_bins=5)
    assert table.count.tolist() == [2, 1, 0, 0, 1]


def test_ece_is_zero_when_calibrated_and_accepts_tensors() -> None:
    conf = torch.full((10,), 0.7)
    correct = torch.tensor([1.0] * 7 + [0.0] * 3)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error([0.9] * 4, [0.0] * 4) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "conf, correct, match",
    [
        ([0.5, 0.6], [1.0], "shape"),
        ([0.5, 1.2], [1.0, 0.0], r"\[0, 1\]"),
        ([0.5, 0.6], [1.0, -0.1], r"\[0, 1\]"),
        ([0.5, float("nan")], [1.0, 0.0], "NaN"),
        ([[0.5]], [[1.0]], "dimension"),
    ],
)
def test_ece_rejects_bad_input(conf, correct, match) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(conf, correct)


def test_reliability_diagram_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200)
    correct = (rng.uniform(0, 1, 200) < conf).astype(float)
    out = reliability_diagram(conf, correct, 15, tmp_path / "sub" / "rel.png", "test model")
    assert out == tmp_path / "sub" / "rel.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# --- PAvPU --------------------------------------------------------------------------------------


def test_t_distribution_closed_form_matches_hand_value_and_scipy() -> None:
    # df = 4, t = sqrt(24): tan(theta) = sqrt(6), A = sqrt(6/7) * (1 + 1/14)
    p = _student_t_sf_two_sided(np.array([math.sqrt(24.0)]), 4)[0]
    assert p == pytest.approx(1 - 15 / 14 * math.sqrt(6 / 7), abs=1e-12)
    # df = 1 is the Cauchy distribution: P(|T| >= 1) = 1/2
    assert _student_t_sf_two_sided(np.array([1.0]), 1)[0] == pytest.approx(0.5)
    stats = pytest.importorskip("scipy.stats")
    t = np.array([0.0, 0.3, 1.0, 2.0, 2.7, 5.0, -3.1, 12.0])
    for df in [1, 2, 3, 4, 5, 7, 10, 38, 39]:
        expected = 2 * stats.t.sf(np.abs(t), df)
        assert _student_t_sf_two_sided(t, df) == pytest.approx(expected, abs=1e-10)


def test_top2_pvalue_hand_worked() -> None:
    # One question, S = 3 samples, A = 3 answers. Top two by mean: answer 0 (.6) and 2 (.2).
    probs = np.array([[[0.5, 0.0, 0.1]], [[0.6, 0.0, 0.2]], [[0.7, 0.0, 0.3]]])  # (S, N, A)
    # diff .4, both sample variances .01, se = sqrt(.01 * 2/3), t = sqrt(24), df = 4
    p = top2_ttest_pvalues(probs)
    assert p.shape == (1,)
    assert p[0] == pytest.approx(1 - 15 / 14 * math.sqrt(6 / 7), abs=1e-12)


def test_top2_pvalues_match_scipy_ttest_ind() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20, 50, 6)) * 0.7 + rng.normal(size=(1, 50, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p = top2_ttest_pvalues(torch.from_numpy(probs))
    order = np.argsort(-probs.mean(0), axis=1)
    for i in range(50):
        a, b = order[i, 0], order[i, 1]
        expected = stats.ttest_ind(probs[:, i, a], probs[:, i, b]).pvalue
        assert p[i] == pytest.approx(expected, abs=1e-9)
    assert (p < 0.05).any() and (p >= 0.05).any()  # the fixture exercises both outcomes


def _question(kind: str, s: int = 20) -> np.ndarray:
    """(S, A=3) samples: 'certain' = top answer far ahead, 'uncertain' = top two tied on average."""
    sign = np.array([(-1) ** k for k in range(s)], dtype=float)
    out = np.zeros((s, 3))
    if kind == "certain":
        out[:, 0], out[:, 1] = 0.80 + 0.02 * sign, 0.15 - 0.02 * sign
    else:
        out[:, 0], out[:, 1] = 0.45 + 0.10 * sign, 0.45 - 0.10 * sign
    out[:, 2] = 1 - out[:, 0] - out[:, 1]
    return out


def test_pavpu_on_constructed_samples() -> None:
    kinds = ["certain", "certain", "uncertain", "uncertain", "certain"]
    probs = np.stack([_question(k) for k in kinds], axis=1)  # (20, 5, 3)
    p = top2_ttest_pvalues(probs)
    assert (p[[0, 1, 4]] < 1e-6).all() and (p[[2, 3]] == pytest.approx(1.0))
    # accurate (>= .5): q0 certain, q2 uncertain;  inaccurate: q1 certain, q3 uncertain (0.3 < .5),
    # q4 certain (0.0)
    acc = [1.0, 0.0, 0.6, 0.3, 0.0]
    out = pavpu(probs, acc)
    assert (out["n_ac"], out["n_au"], out["n_ic"], out["n_iu"], out["n"]) == (1, 1, 2, 1, 5)
    assert out["pavpu"] == pytest.approx((1 + 1) / 5)
    assert out["p_accurate_given_certain"] == pytest.approx(1 / 3)
    assert out["p_uncertain_given_inaccurate"] == pytest.approx(1 / 3)
    # perfect uncertainty: certain exactly when accurate
    out = pavpu(probs, [1.0, 1.0, 0.0, 0.3, 0.9])
    assert out["pavpu"] == 1.0 and out["n_au"] == 0 and out["n_ic"] == 0
    # the accuracy threshold is inclusive and configurable
    assert pavpu(probs, [0.5, 1, 0, 0, 1])["n_ac"] == 3
    assert pavpu(probs, [0.6, 1, 0, 0, 1], accuracy_threshold=0.9)["n_ic"] == 1
    # a lax p threshold makes everything certain
    assert pavpu(probs, acc, p_threshold=1.01)["n_au"] == 0


def test_pavpu_degenerate_samples() -> None:
    # No dropout effect: identical samples. Different top-two means -> certain; a tie -> uncertain.
    same = np.tile(np.array([[[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]]), (20, 1, 1))
    assert top2_ttest_pvalues(same).tolist() == [0.0, 1.0]
    assert math.isnan(pavpu(same, [1.0, 1.0])["p_uncertain_given_inaccurate"])


@pytest.mark.parametrize(
    "probs, acc, match",
    [
        (np.zeros((1, 2, 3)), [1.0, 1.0], "2 MC samples"),
        (np.zeros((5, 2, 1)), [1.0, 1.0], "2 answers"),
        (np.zeros((5, 2, 3)), [1.0], "questions"),
        (np.zeros((5, 2)), [1.0, 1.0], "dimension"),
        (np.zeros((5, 2, 3)), [1.0, 1.5], r"\[0, 1\]"),
    ],
)
def test_pavpu_rejects_bad_input(probs, acc, match) -> None:
    with pytest.raises(ValueError, match=match):
        pavpu(probs, acc)


# --- feature noise ------------------------------------------------------------------------------


def test_noise_only_on_valid_regions() -> None:
    features = torch.zeros(3, 5, 4)
    counts = torch.tensor([5, 2, 0])
    gen = torch.Generator().manual_seed(0)
    noisy = noise_features(features, counts, 1.0, gen)
    assert noisy.shape == features.shape and torch.count_nonzero(features) == 0  # not in place
    valid = torch.arange(5)[None] < counts[:, None]
    assert (noisy[valid] != 0).all()
    assert (noisy[~valid] == 0).all()
    again = noise_features(features, counts, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)


def test_noise_statistics_dtype_and_zero_std() -> None:
    features = torch.ones(8, 50, 64)
    counts = torch.full((8,), 50)
    noisy = noise_features(features, counts, 2.0, torch.Generator().manual_seed(1))
    delta = noisy - features
    assert delta.mean().abs() < 0.05 and abs(delta.std().item() - 2.0) < 0.05
    half = noise_features(features.half(), counts, 1.0, torch.Generator().manual_seed(1))
    assert half.dtype == torch.float16
    assert torch.equal(noise_features(features, counts, 0.0), features)


@pytest.mark.parametrize(
    "counts, std, match",
    [
        (torch.tensor([1, 2]), -1.0, ">= 0"),
        (torch.tensor([1, 2]), float("nan"), ">= 0"),
        (torch.tensor([1, 2, 3]), 1.0, "region_counts"),
        (torch.tensor([1, 6]), 1.0, r"\[0, 5\]"),
    ],
)
def test_noise_rejects_bad_input(counts, std, match) -> None:
    with pytest.raises(ValueError, match=match):
        noise_features(torch.zeros(2, 5, 3), counts, std)
