"""Alignment attention: distances between the query set and the key set of every attention head.

Zhang et al., "Alignment Attention by Matching Key and Query Distributions", NeurIPS 2021. Within
one head h and one sample b the n valid queries and the m valid keys are two empirical
distributions; a distance D between them is added to the task loss with weight λ. See
``shared/ALIGNMENT.md`` (and the README) for the exact math followed here.

Shapes: heads are a batch dimension. Every distance takes

    queries  (B, H, Nq, d)   projected queries, before the 1/sqrt(d) scaling
    keys     (B, H, Nk, d)   projected keys
    q_valid  (B, Nq) bool    True = a real position (padding never enters a distribution)
    k_valid  (B, Nk) bool

and returns a (B, H) tensor: one distance per sample and head. The distances themselves (their
math, helper networks and implementations) live in :mod:`vqa_align.align.distances`, one module
each, listed in its registry; this module holds :class:`HeadAligner`, which runs one of them for an
attention module, and the diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from vqa_align.align.distances import DISTANCES, distance_module, implementation
from vqa_align.align.distances.ct import identity_conditional_transport

class AlignmentSettings(Protocol):
    """What the aligners read of a configuration: :class:`vqa_align.config.AlignmentConfig` has these
    fields. Declared here because the configuration sits above this layer (it validates against
    the distance registry), so this layer names no type of it."""

    method: str
    weight: float
    modules: list[str]
    helper_hidden: int
    helper_out: int
    helper_precision: str
    kernels: str
    ct_rho: float
    gan_leaky_slope: float
    ot_epsilon: float
    ot_iterations: int
    ot_tolerance: float
    ot_cost: str

    def validate(self, where: str = ...) -> None: ...


class HeadAligner(nn.Module):
    """The alignment distance of one attention module; helper networks shared by its heads.

    ``forward(queries, keys, q_valid, k_valid)`` returns the (B, H) distance of ``config.method``
    (for ``gan`` the discriminator loss, which rises towards 2·log 2 as queries and keys become
    indistinguishable). Which implementation runs is ``kernels`` (``config.kernels``: reference,
    fused, triton or auto), looked up per call in the dispatch table
    :func:`vqa_align.align.distances.implementation` (same values and gradients; ``reference``, the
    plain modules under autograd, also has second-order gradients). Set ``.kernels`` to change it.
    """

    def __init__(self, head_dim: int, config: AlignmentSettings):
        super().__init__()
        if config.method not in DISTANCES:
            raise ValueError(f"unknown alignment method {config.method!r}")
        self.method = config.method
        self.kernels = config.kernels
        self.helper_precision = config.helper_precision
        self.rho = config.ct_rho
        self.ot_epsilon = config.ot_epsilon
        self.ot_iterations = config.ot_iterations
        self.ot_tolerance = config.ot_tolerance
        self.ot_cost = config.ot_cost
        if DISTANCES[self.method].module is not None:
            for name, helper in distance_module(self.method).build_helpers(head_dim, config).items():
                self.add_module(name, helper)

    def forward(self, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
        if DISTANCES[self.method].module is None:
            raise RuntimeError(f"HeadAligner with method {self.method!r} should not be called")
        return implementation(self.method, self.kernels, queries, keys)(self, queries, keys, q_valid, k_valid)


def gaussian_mmd2(x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor) -> Tensor:
    """Squared MMD (biased V-statistic) with a Gaussian kernel, median-heuristic bandwidth.

    Args:
        x: (B, H, Nx, d), y: (B, H, Ny, d); x_valid (B, Nx), y_valid (B, Ny).
    Returns:
        (B, H). k(a, b) = exp(-|a-b|² / (2σ²)), σ = median of the pairwise distances between
        distinct points of the union of both valid sets. MMD²(X, X) = 0 exactly.
    """
    x, y = x.float(), y.float()
    z = torch.cat([x, y], dim=-2)  # (B, H, N, d)
    z_valid = torch.cat([x_valid, y_valid], dim=-1)  # (B, N)
    sq_dist = torch.cdist(z, z).pow(2)  # (B, H, N, N)
    n_total = z.shape[-2]
    pair_valid = z_valid[:, None, :, None] & z_valid[:, None, None, :]
    off_diagonal = ~torch.eye(n_total, dtype=torch.bool, device=z.device)
    median_sq = torch.nanmedian(
        torch.where(pair_valid & off_diagonal, sq_dist, torch.full_like(sq_dist, float("nan"))).flatten(-2),
        dim=-1,
    ).values  # (B, H)
    bandwidth_sq = torch.nan_to_num(median_sq, nan=1.0).clamp_min(1e-12)
    kernel = torch.exp(-sq_dist / (2.0 * bandwidth_sq[..., None, None]))
    nx = x.shape[-2]
    in_x = torch.zeros_like(z_valid)
    in_x[:, :nx] = True
    wx = (z_valid & in_x).float()
    wy = (z_valid & ~in_x).float()
    wx = wx / wx.sum(-1, keepdim=True).clamp_min(1.0)
    wy = wy / wy.sum(-1, keepdim=True).clamp_min(1.0)
    w = (wx - wy)[:, None, :]  # (B, 1, N): signed weights of the two empirical measures
    return torch.einsum("bhi,bhij,bhj->bh", w.expand(-1, z.shape[1], -1), kernel, w.expand(-1, z.shape[1], -1))


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------


@dataclass
class AttentionDetails:
    """What one attention module saw in one forward pass (returned when details are requested)."""

    queries: Tensor  # (B, H, Nq, d) projected queries (padding rows included; see q_valid)
    keys: Tensor  # (B, H, Nk, d)
    attention: Tensor  # (B, H, Nq, Nk) attention weights (rows of padded queries are meaningless)
    q_valid: Tensor  # (B, Nq) bool
    k_valid: Tensor  # (B, Nk) bool


@dataclass
class ModuleDiagnostics:
    """Per-head alignment diagnostics of one attention module, for every sample of a batch."""

    name: str  # e.g. "decoder.3.guided_attention"
    kind: str  # "sa_question" | "sa_image" | "sga_guided"
    layer: int
    details: AttentionDetails
    ct: Tensor  # (B, H) parameter-free CT (comparable across models)
    mmd2: Tensor  # (B, H) Gaussian-kernel MMD² between the query and the key set
    learned_distance: Tensor | None  # (B, H) the module's own training distance, if it has one


def diagnose_module(
    name: str, kind: str, layer: int, details: AttentionDetails, aligner: HeadAligner | None
) -> ModuleDiagnostics:
    q, k, qv, kv = details.queries, details.keys, details.q_valid, details.k_valid
    learned = aligner(q, k, qv, kv).detach() if aligner is not None else None
    return ModuleDiagnostics(
        name=name,
        kind=kind,
        layer=layer,
        details=details,
        ct=identity_conditional_transport(q, k, qv, kv).detach(),
        mmd2=gaussian_mmd2(q, k, qv, kv).detach(),
        learned_distance=learned,
    )
