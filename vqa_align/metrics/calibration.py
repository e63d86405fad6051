"""Calibration and uncertainty measures for VQA, as the alignment-attention paper reports them.

* Expected calibration error (ECE) of the top-1 answer, with equal-width bins, and a reliability
  diagram (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017). For VQA the
  "correctness" of an answer is its soft VQA accuracy in [0, 1], so a bin's accuracy is the mean
  VQA accuracy of the answers that fall into it.
* PAvPU -- "patch accuracy vs. patch uncertainty" of Mukhoti & Gal ("Evaluating Bayesian Deep
  Learning Methods for Semantic Segmentation", 2018), used per question (a "patch" is one
  question) with MC-dropout samples, as in Bayesian Attention Modules (Fan et al., NeurIPS 2020)
  and Alignment Attention (Zhang et al., NeurIPS 2021): see :func:`pavpu`.
* Feature noise for the robustness study: :func:`noise_features`.

Inputs may be numpy arrays or (CPU or CUDA) torch tensors; everything except
:func:`noise_features` computes in float64 numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is only needed by noise_features; keep the import lazy
    import torch


def _as_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (possibly on the GPU)
        x = x.detach().double().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_unit(arr: np.ndarray, name: str) -> None:
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min():g}, {arr.max():g}]")


# --- expected calibration error -----------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationTable:
    """Per-bin statistics of a reliability diagram; every field has shape (n_bins,).

    Bin b covers confidences in (lower[b], upper[b]]; the first bin also holds confidence 0.
    ``confidence`` and ``accuracy`` are the means over the bin (0 for an empty bin).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """sum_b |B_b| / N * |accuracy_b - confidence_b|."""
        n = self.count.sum()
        if n == 0:
            return 0.0
        return float(np.sum(self.count / n * np.abs(self.accuracy - self.confidence)))

    def as_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-friendly copy."""
        return {
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "count": self.count.astype(int).tolist(),
            "confidence": self.confidence.tolist(),
            "accuracy": self.accuracy.tolist(),
        }


def calibration_table(confidences: Any, correct: Any, n_bins: int = 15) -> CalibrationTable:
    """Bin the top-1 confidences into ``n_bins`` equal-width bins over [0, 1].

    Args:
        confidences: (N,) probability of the predicted (top-1) answer, in [0, 1].
        correct: (N,) VQA accuracy of that answer, in [0, 1] (0/1 for plain classification).
        n_bins: number of bins (the paper: 15).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = _as_numpy(confidences, "confidences", 1)
    acc = _as_numpy(correct, "correct", 1)
    if conf.shape != acc.shape:
        raise ValueError(f"confidences {conf.shape} and correct {acc.shape} differ in shape")
    _check_unit(conf, "confidences")
    _check_unit(acc, "correct")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins (lo, hi] as in Guo et al.; confidence 0 goes to the first bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=acc, minlength=n_bins)
    safe = np.maximum(count, 1.0)
    return CalibrationTable(
        lower=edges[:-1],
        upper=edges[1:],
        count=count,
        confidence=np.where(count > 0, conf_sum / safe, 0.0),
        accuracy=np.where(count > 0, acc_sum / safe, 0.0),
    )


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins.

    Args:
        confidences: (N,) top-1 confidence in [0, 1].
        correct: (N,) VQA accuracy of the top-1 answer in [0, 1].
        n_bins: number of bins (15 as in the paper).

    Returns:
        ECE as a fraction in [0, 1] (multiply by 100 for the percent the paper prints).
    """
    return calibration_table(confidences, correct, n_bins).ece


def reliability_diagram(
    confidences: Any,
    correct: Any,
    n_bins: int = 15,
    path: str | Path = "reliability.png",
    title: str = "Reliability diagram",
) -> Path:
    """Write a reliability diagram (per-bin accuracy vs. confidence, with the gap shaded and a
    confidence histogram below) as a PNG and return its path."""
    # The object-oriented API renders with Agg without touching pyplot's global state, so this is
    # safe on headless servers and inside the (threaded) Gradio app.
    from matplotlib.figure import Figure

    table = calibration_table(confidences, correct, n_bins)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = table.upper - table.lower
    centers = (table.lower + table.upper) / 2
    fig = Figure(figsize=(5, 6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = table.count > 0
    ax.bar(table.lower[filled], table.accuracy[filled], width=width[filled], align="edge",
           color="tab:blue", edgecolor="black", label="accuracy")
    gap_lo = np.minimum(table.accuracy, table.confidence)
    ax.bar(table.lower[filled], np.abs(table.confidence - table.accuracy)[filled],
           bottom=gap_lo[filled], width=width[filled], align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE = {100 * table.ece:.2f}%")
    ax.legend(loc="upper left")
    hist.bar(centers, table.count / max(table.count.sum(), 1), width=width, color="gray",
             edgecolor="black")
    hist.set_xlabel("confidence")
    hist.set_ylabel("fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path


# --- PAvPU --------------------------------------------------------------------------------------


def _student_t_sf_two_sided(t: np.ndarray, df: int) -> np.ndarray:
    """Two-sided p-value P(|T| >= |t|) of Student's t with integer ``df`` degrees of freedom.

    Closed form for integer df (Abramowitz & Stegun 26.7.3-4), so no scipy at run time:
    with theta = atan(|t| / sqrt(df)), A = P(|T| < |t|) is
      df odd:  (2/pi) * (theta + sin(theta) * sum_{k=0}^{(df-3)/2} c_k cos^{2k+1}(theta)),
               c_0 = 1, c_k = c_{k-1} * 2k / (2k + 1);
      df even: sin(theta) * sum_{k=0}^{(df-2)/2} d_k cos^{2k}(theta),
               d_0 = 1, d_k = d_{k-1} * (2k - 1) / (2k).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = np.arctan(np.abs(t) / math.sqrt(df))
    s, c = np.sin(theta), np.cos(theta)
    if df % 2 == 1:
        total = np.zeros_like(theta)
        if df > 1:
            coef, term = 1.0, c.copy()
            total = total + term
            for k in range(1, (df - 3) // 2 + 1):
                coef *= 2 * k / (2 * k + 1)
                term = term * c * c
                total = total + coef * term
        a = 2.0 / math.pi * (theta + s * total)
    else:
        coef, term = 1.0, np.ones_like(theta)
        total = term.copy()
        for k in range(1, (df - 2) // 2 + 1):
            coef *= (2 * k - 1) / (2 * k)
            term = term * c * c
            total = total + coef * term
        a = s * total
    return np.clip(1.0 - a, 0.0, 1.0)


def top2_ttest_pvalues(mc_probs: Any) -> np.ndarray:
    """p-value per question of a two-sample t-test between the two most probable answers.

    For each question the two answers with the highest *mean* probability over the S samples
    are compared: their S sampled probabilities form two samples, tested with the classical
    equal-variance two-sample t-test (``scipy.stats.ttest_ind`` default; with equal sample sizes
    its t equals Welch's), two-sided, df = 2S - 2. A small p means the top answer is
    significantly better than the runner-up, i.e. the model is *certain*.

    Degenerate zero-variance cases: different means -> p = 0 (certain), equal means -> p = 1.

    Args:
        mc_probs: (S, N, A) answer probabilities (softmax or sigmoid scores) of S stochastic
            forward passes (MC dropout) for N questions over A answers; S >= 2, A >= 2.

    Returns:
        (N,) p-values in [0, 1].
    """
    probs = _as_numpy(mc_probs, "mc_probs", 3)
    s, _, a = probs.shape
    if s < 2:
        raise ValueError(f"need at least 2 MC samples for a t-test, got {s}")
    if a < 2:
        raise ValueError(f"need at least 2 answers to compare the top two, got {a}")
    mean = probs.mean(axis=0)  # (N, A)
    top2 = np.argsort(-mean, axis=1, kind="stable")[:, :2]  # (N, 2)
    x1 = np.take_along_axis(probs, top2[None, :, 0:1], axis=2)[..., 0]  # (S, N)
    x2 = np.take_along_axis(probs, top2[None, :, 1:2], axis=2)[..., 0]  # (S, N)
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    pooled_var = (x1.var(axis=0, ddof=1) + x2.var(axis=0, ddof=1)) / 2.0
    se = np.sqrt(pooled_var * 2.0 / s)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.inf)
    p = _student_t_sf_two_sided(np.where(np.isfinite(t), t, 0.0), 2 * s - 2)
    p = np.where(np.isfinite(t), p, np.where(np.abs(diff) > 0, 0.0, 1.0))
    return p


def pavpu(
    mc_probs: Any,
    accuracies_of_mean_prediction: Any,
    p_threshold: float = 0.05,
    accuracy_threshold: float = 0.5,
) -> dict[str, float]:
    """PAvPU (Mukhoti & Gal, 2018) over questions, with MC-dropout t-test uncertainty.

    Definition implemented (the one of Bayesian Attention Modules, Fan et al. 2020, reused by
    Alignment Attention, Zhang et al. 2021, with 20 MC-dropout samples and p = 0.05):

    * uncertainty of a question: the p-value of a two-sample t-test between the S sampled
      probabilities of the two answers with the highest mean probability
      (:func:`top2_ttest_pvalues`); the prediction is **certain** when ``p < p_threshold``
      and uncertain otherwise;
    * the prediction (argmax of the mean over samples) is **accurate** when its VQA accuracy
      is ``>= accuracy_threshold``. The papers do not spell out how a soft VQA accuracy becomes
      accurate/inaccurate; 0.5 is our choice: an answer counts as right when at least two of
      the ten annotators gave it (2 matches -> 0.6, 1 match -> 0.3);
    * PAvPU = (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu), the fraction of questions that are
      accurate-and-certain or inaccurate-and-uncertain.

    Args:
        mc_probs: (S, N, A) answer probabilities of S stochastic passes.
        accuracies_of_mean_prediction: (N,) VQA accuracy in [0, 1] of the argmax of the mean
            prediction ``mc_probs.mean(0)``.
        p_threshold: certainty level of the t-test (the paper: 0.05).
        accuracy_threshold: VQA accuracy at or above which an answer is "accurate".

    Returns:
        ``{"pavpu", "p_accurate_given_certain", "p_uncertain_given_inaccurate", "n_ac", "n_au",
        "n_ic", "n_iu", "n", "mean_p_value"}`` (conditional probabilities are NaN when their
        condition never occurs).
    """
    acc = _as_numpy(accuracies_of_mean_prediction, "accuracies_of_mean_prediction", 1)
    _check_unit(acc, "accuracies_of_mean_prediction")
    p = top2_ttest_pvalues(mc_probs)
    if p.shape != acc.shape:
        raise ValueError(
            f"mc_probs has {p.shape[0]} questions but accuracies_of_mean_prediction has "
            f"{acc.shape[0]}"
        )
    n = int(acc.shape[0])
    if n == 0:
        raise ValueError("pavpu needs at least one question")
    accurate = acc >= accuracy_threshold
    certain = p < p_threshold
    n_ac = int(np.sum(accurate & certain))
    n_au = int(np.sum(accurate & ~certain))
    n_ic = int(np.sum(~accurate & certain))
    n_iu = int(np.sum(~accurate & ~certain))
    nan = float("nan")
    return {
        "pavpu": (n_ac + n_iu) / n,
        "p_accurate_given_certain": n_ac / (n_ac + n_ic) if n_ac + n_ic else nan,
        "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu) if n_ic + n_iu else nan,
        "n_ac": n_ac,
        "n_au": n_au,
        "n_ic": n_ic,
        "n_iu": n_iu,
        "n": n,
        "mean_p_value": float(p.mean()),
    }


# --- robustness ---------------------------------------------------------------------------------


def noise_features(
    features: torch.Tensor,
    region_counts: torch.Tensor,
    std: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add N(0, std^2) noise to the valid regions of a padded batch of region features.

    Args:
        features: (B, K, D) region features, padded along K.
        region_counts: (B,) integer number of valid regions per image (the first ones).
        std: noise standard deviation (the paper's robustness study: 1.0); 0 returns the input.
        generator: optional ``torch.Generator`` (on the features' device) for reproducibility.

    Returns:
        (B, K, D) tensor of the input dtype; padded rows are left exactly as they were.
    """
    import torch

    if not math.isfinite(std) or std < 0:
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    if features.ndim != 3:
        raise ValueError(f"features must be (B, K, D), got shape {tuple(features.shape)}")
    b, k, _ = features.shape
    if region_counts.shape != (b,):
        raise ValueError(f"region_counts must be ({b},), got shape {tuple(region_counts.shape)}")
    counts = region_counts.to(features.device)
    if bool((counts < 0).any()) or bool((counts > k).any()):
        raise ValueError(f"region_counts must lie in [0, {k}]")
    if std == 0:
        return features
    valid = torch.arange(k, device=features.device)[None, :] < counts[:, None]  # (B, K)
    # Draw in float32 so float16 stores get the same noise distribution as float32 ones.
    noise = torch.randn(features.shape, generator=generator, device=features.device,
                        dtype=torch.float32)
    noisy = features.float() + std * noise * valid[..., None].float()
    return noisy.to(features.dtype)
