"""Is an uploaded picture like the pictures the model was trained on? A cheap check on its features.

Each picture is summarised by its pooled feature, the mean of its N region features (N, D) -> (D,).
The training pictures' pooled features give a per-dimension mean and standard deviation; a picture's
novelty is the root mean square of its z-scores over the D dimensions. The threshold is the
``NOVELTY_QUANTILE`` quantile of the training pictures' own novelty, so by construction about 1 %
of training pictures lie above it; a picture above it gets a warning with its answer (the model
answers anyway, and for a photo unlike anything it saw the answer means little).

    stats = store_stats(store, train_image_ids, max_regions)   # once per model (about 0.5 s)
    score = novelty(stats, regions.features)                   # per upload (microseconds)
    score > stats.threshold                                    # -> warn
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

NOVELTY_QUANTILE = 0.99  # training pictures above this quantile of their own novelty are rare (1 %)
NOVELTY_IMAGES = 2000  # training pictures sampled for the statistics (a fixed, seeded sample)
NOVELTY_SEED = 0
# Dimensions (nearly) constant in training get a floor on their standard deviation, a fraction of the
# median one: a small deviation there must not outweigh all other dimensions.
STD_FLOOR_FRACTION = 0.1


@dataclass
class FeatureStats:
    """Per-dimension statistics of the training pictures' pooled features, and the warning threshold."""

    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,) floored
    threshold: float  # NOVELTY_QUANTILE quantile of the training pictures' novelty
    images: int  # training pictures the statistics were computed from


def pooled(features: Any) -> np.ndarray:
    """(N, D) region features of one picture -> (D,) their mean (float64)."""
    return np.asarray(features, np.float64).reshape(-1, np.shape(features)[-1]).mean(axis=0)


def novelty(stats: FeatureStats, features: Any) -> float:
    """Root mean square z-score of one picture's pooled feature; ``features`` (N, D) its regions."""
    return float(_scores(stats.mean, stats.std, pooled(features)[None])[0])


def _scores(mean: np.ndarray, std: np.ndarray, pooled_features: np.ndarray) -> np.ndarray:
    """(P, D) pooled features -> (P,) RMS z-scores."""
    return np.sqrt((((pooled_features - mean) / std) ** 2).mean(axis=1))


def fit_stats(pooled_features: Any, quantile: float = NOVELTY_QUANTILE) -> FeatureStats:
    """Statistics of (P, D) pooled training features; the threshold is the ``quantile`` of their novelty."""
    x = np.asarray(pooled_features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (pictures >= 2, D) pooled features, got shape {x.shape}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    floor = STD_FLOOR_FRACTION * float(np.median(std))
    std = np.maximum(std, floor if floor > 0 else 1e-6)
    threshold = float(np.quantile(_scores(mean, std, x), quantile))
    return FeatureStats(mean, std, threshold, len(x))


def store_stats(store: Any, image_ids: Iterable[int] | None = None, max_regions: int | None = None,
                max_images: int = NOVELTY_IMAGES, seed: int = NOVELTY_SEED) -> FeatureStats:
    """:func:`fit_stats` of a feature store's pictures (``image_ids``, default all), a seeded sample
    of at most ``max_images``, each cut to the first ``max_regions`` regions as the model reads them."""
    ids = np.asarray(sorted(set(int(i) for i in image_ids)) if image_ids is not None else store.image_ids, np.int64)
    rows = store.rows(ids)
    rows = rows[rows >= 0]
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    feats = [store.read_row(int(r), max_regions)[0] for r in rows]
    return fit_stats(np.stack([pooled(f) for f in feats if len(f)]))


__all__ = ["NOVELTY_QUANTILE", "FeatureStats", "fit_stats", "novelty", "pooled", "store_stats"]
