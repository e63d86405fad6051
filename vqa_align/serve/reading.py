"""Reading aids for what the app shows: when is attention "near-uniform", and what value of CT and
MMD² a head would have if its queries and keys came from one distribution.

    normalised_entropy(weights)      (..., m) -> (...): entropy / log(m), 1 = uniform
    near_uniform(weights)            mean normalised entropy of the rows > NEAR_UNIFORM_ENTROPY
    resplit_baseline(q, k, ...)      (H,) CT and MMD² of the pooled queries and keys, randomly re-split

Why a re-split baseline: neither distance has a scale a reader knows. MMD² is 0 for identical sets
but CT is not (it transports each point to a softmax-weighted mix of the other set), and both depend
on the number of points and the dimension. Pooling a head's n queries and m keys and splitting them
at random into sets of n and m keeps everything but the difference between queries and keys; the
values of those splits are what "no gap at all" looks like for this very head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vqa_align.align.aligner import gaussian_mmd2
from vqa_align.align.distances.ct import identity_conditional_transport

# A distribution over m >= 2 items whose entropy is above this fraction of log(m) is called
# near-uniform: e.g. 49 regions with weights 0.015-0.025 score 0.99; one region holding half of the
# weight among 6 scores 0.84.
NEAR_UNIFORM_ENTROPY = 0.95
RESPLITS = 16  # random re-splits averaged per head (their spread is a few % of the mean)
RESPLIT_SEED = 0  # fixed: the same request shows the same baseline


def normalised_entropy(weights: Any) -> np.ndarray:
    """Entropy of each row of ``weights`` (..., m), normalised by log(m): 1 = uniform, 0 = one item.

    Rows are normalised to sum to 1 first; negative weights count as 0; rows of fewer than 2
    items, or of zeros only, get 0 (there is nothing to spread over).
    """
    w = np.clip(np.asarray(weights, np.float64), 0.0, None)
    m = w.shape[-1]
    total = w.sum(axis=-1, keepdims=True)
    if m < 2:
        return np.zeros(w.shape[:-1])
    p = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis=-1) / np.log(m)


def near_uniform(weights: Any) -> tuple[bool, float]:
    """(near-uniform?, mean normalised entropy) of a distribution (m,) or of the rows of (n, m)."""
    h = normalised_entropy(weights)
    score = float(np.mean(h)) if np.size(h) else 0.0
    return score > NEAR_UNIFORM_ENTROPY, score


@dataclass
class Baseline:
    """Per head: mean CT and MMD² of ``RESPLITS`` random re-splits of the pooled queries and keys."""

    ct: np.ndarray  # (H,)
    mmd2: np.ndarray  # (H,)


def resplit_baseline(queries: torch.Tensor, keys: torch.Tensor, resplits: int = RESPLITS,
                     seed: int = RESPLIT_SEED) -> Baseline:
    """CT and MMD² of one sample's heads when queries (H, n, d) and keys (H, m, d) are pooled and
    re-split at random into sets of n and m (the same permutations for every head)."""
    heads, n, _ = queries.shape
    pooled = torch.cat([queries.float(), keys.float()], dim=1)  # (H, n + m, d)
    generator = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(pooled.shape[1], generator=generator) for _ in range(resplits)])
    mixed = pooled[:, perms.to(pooled.device)].transpose(0, 1)  # (R, H, n + m, d)
    x, y = mixed[:, :, :n], mixed[:, :, n:]
    x_valid = torch.ones(resplits, n, dtype=torch.bool, device=pooled.device)
    y_valid = torch.ones(resplits, y.shape[2], dtype=torch.bool, device=pooled.device)
    ct = identity_conditional_transport(x, y, x_valid, y_valid).mean(0)  # (H,)
    mmd2 = gaussian_mmd2(x, y, x_valid, y_valid).mean(0)
    return Baseline(ct.cpu().numpy(), mmd2.cpu().numpy())


__all__ = ["NEAR_UNIFORM_ENTROPY", "Baseline", "near_uniform", "normalised_entropy", "resplit_baseline"]
