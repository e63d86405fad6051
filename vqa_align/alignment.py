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

and returns a (B, H) tensor: one distance per sample and head.

Gradient directions (the paper's, not the public code's):
- ``ct``: Q/K projections and the navigator minimise CT; the critic maximises it (its parameters'
  gradients are negated by tensor hooks, so the gradient flowing through the critic into q/k is
  untouched).
- ``gan``: the discriminator minimises BCE(D(k), 1) + BCE(D(q), 0); q and k both reach it through a
  gradient-reversal layer, so the projections maximise it.
- ``ot``: entropic OT with a detached Sinkhorn plan (envelope theorem); gradients reach q/k via the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.alignment_kernels import fused_adversarial_loss, fused_conditional_transport
from vqa_align.config import AlignmentConfig

# Large negative logit for masked positions; finite (unlike -inf) so that fully-masked rows of padded
# queries never produce NaN, which could otherwise leak into gradients through 0 * NaN.
_MASKED = -1e9


# ----------------------------------------------------------------------------------------------
# Gradient reversal
# ----------------------------------------------------------------------------------------------


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """Identity in the forward pass; negates the gradient in the backward pass."""
    return _GradientReversal.apply(x)


def call_with_reversed_parameters(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module(x)`` so that ``module`` ascends the loss: its parameters' gradients are negated.

    Used for the CT critic, which maximises the transport cost while the gradient that flows
    *through* the critic into the queries and keys keeps its sign. Done per call (not with
    persistent tensor hooks) so that copies, DDP wrappers and reloaded modules behave the same.
    """
    reversed_params = {name: reverse_gradient(p) for name, p in module.named_parameters()}
    return torch.func.functional_call(module, reversed_params, (x,))


# ----------------------------------------------------------------------------------------------
# Pure distance functions
# ----------------------------------------------------------------------------------------------


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` (B, H, N) over the valid positions ``valid`` (B, N) -> (B, H)."""
    weights = valid[:, None, :].to(values.dtype)
    return (values * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def conditional_transport(
    nav_q: Tensor,
    nav_k: Tensor,
    crit_q: Tensor,
    crit_k: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    rho: float = 0.5,
) -> Tensor:
    """Bidirectional conditional transport between queries and keys, per sample and head.

    Args:
        nav_q, nav_k: navigator outputs f(q) (B, H, Nq, r), f(k) (B, H, Nk, r), L2-normalised.
        crit_q, crit_k: critic outputs g(q) (B, H, Nq, r'), g(k) (B, H, Nk, r'), L2-normalised.
        q_valid, k_valid: (B, Nq), (B, Nk) bool masks of real positions.
        rho: weight of the forward (query -> key) direction.

    Returns:
        (B, H): ρ·(1/n)Σ_i Σ_j π(k_j|q_i) c_ij + (1-ρ)·(1/m)Σ_j Σ_i π(q_i|k_j) c_ij with
        π(k_j|q_i) = softmax_j(f(q_i)·f(k_j)), π(q_i|k_j) = softmax_i(f(q_i)·f(k_j)),
        c_ij = 1 - g(q_i)·g(k_j).

    Because the plans are softmaxes and the cost is affine in a dot product,
    Σ_j π(k_j|q_i) c_ij = 1 - g(q_i)·Σ_j π(k_j|q_i) g(k_j): the inner sum is attention with
    query f(q), key f(k), value g(k) and unit scale. The (Nq, Nk) cost matrix is never formed and
    both directions run in the fused attention kernel.
    """
    key_mask = k_valid[:, None, None, :]  # (B, 1, 1, Nk)
    query_mask = q_valid[:, None, None, :]  # (B, 1, 1, Nq)
    forward_target = F.scaled_dot_product_attention(nav_q, nav_k, crit_k, attn_mask=key_mask, scale=1.0)
    backward_target = F.scaled_dot_product_attention(nav_k, nav_q, crit_q, attn_mask=query_mask, scale=1.0)
    forward_cost = 1.0 - (crit_q * forward_target).sum(-1)  # (B, H, Nq)
    backward_cost = 1.0 - (crit_k * backward_target).sum(-1)  # (B, H, Nk)
    return rho * _masked_mean(forward_cost, q_valid) + (1.0 - rho) * _masked_mean(backward_cost, k_valid)


def adversarial_loss(logits_q: Tensor, logits_k: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """Discriminator loss BCE(D(k), 1) + BCE(D(q), 0), averaged over valid positions -> (B, H).

    Args:
        logits_q: D(q) (B, H, Nq); logits_k: D(k) (B, H, Nk).
    """
    loss_k = F.binary_cross_entropy_with_logits(logits_k, torch.ones_like(logits_k), reduction="none")
    loss_q = F.binary_cross_entropy_with_logits(logits_q, torch.zeros_like(logits_q), reduction="none")
    return _masked_mean(loss_k, k_valid) + _masked_mean(loss_q, q_valid)


def cosine_cost(queries: Tensor, keys: Tensor) -> Tensor:
    """Cost 1 - cos(q_i, k_j) in [0, 2], i.e. half the squared distance of unit vectors.

    (B, H, Nq, d), (B, H, Nk, d) -> (B, H, Nq, Nk).
    """
    q_unit = F.normalize(queries, dim=-1)
    k_unit = F.normalize(keys, dim=-1)
    return 1.0 - q_unit @ k_unit.transpose(-1, -2)


def sinkhorn_plan(
    cost: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    epsilon: float = 0.01,
    iterations: int = 50,
    tolerance: float = 1e-5,
    check_every: int = 10,
) -> Tensor:
    """Entropic OT plan between uniform distributions over the valid queries and keys.

    Stabilised ("absorbed") Sinkhorn (Schmitzer 2019): the plan is kept as
    π_ij = u_i · exp((f_i + g_j − C_ij)/ε) · v_j with log-domain potentials f, g and exp-domain
    scalings u, v. Each iteration is two matrix-vector products (no logsumexp over the full
    matrix); whenever a scaling leaves [1/τ, τ] it is absorbed into the potentials and the kernel
    is recomputed, so nothing overflows or underflows for small ε. The potentials start at the
    c-transforms (f_i = min_j C_ij, g_j = min_i C_ij − f_i), so every row and column of the first
    kernel holds an entry equal to 1. Runs in at least fp32. Padded positions carry zero mass.

    Up to ``iterations`` (u, v) updates; every ``check_every`` iterations the row marginals are
    checked (the column marginals are exact after each v update) and the loop stops once the L1
    error of every (sample, head) is below ``tolerance`` (total mass is 1).

    Args:
        cost: (B, H, Nq, Nk); q_valid (B, Nq); k_valid (B, Nk).
    Returns:
        plan (B, H, Nq, Nk), rows sum to 1/n and columns to 1/m over valid positions.
    """
    dtype = torch.promote_types(cost.dtype, torch.float32)
    cost = cost.to(dtype)
    n = q_valid.sum(-1).clamp_min(1).to(dtype)  # (B,)
    m = k_valid.sum(-1).clamp_min(1).to(dtype)
    a = (q_valid.to(dtype) / n[:, None])[:, None, :]  # (B, 1, Nq) marginal over the queries
    b = (k_valid.to(dtype) / m[:, None])[:, None, :]  # (B, 1, Nk)
    qv, kv = q_valid[:, None, :], k_valid[:, None, :]  # (B, 1, N)
    pair_valid = q_valid[:, None, :, None] & k_valid[:, None, None, :]  # (B, 1, Nq, Nk)
    big = torch.finfo(dtype).max / 4
    masked_cost = cost.masked_fill(~pair_valid, big)
    f = masked_cost.amin(-1).masked_fill(~qv, 0.0)  # (B, H, Nq)
    g = (masked_cost - f[..., None]).amin(-2).masked_fill(~kv, 0.0)  # (B, H, Nk)
    log_tau = 0.25 * math.log(torch.finfo(dtype).max)  # absorb before u·K·v can overflow
    tiny = torch.finfo(dtype).tiny
    max_exponent = 0.5 * math.log(torch.finfo(dtype).max)

    def kernel() -> tuple[Tensor, Tensor]:
        exponent = (f[..., :, None] + g[..., None, :] - masked_cost) / epsilon  # -huge at padding
        K = torch.exp(exponent.clamp_max(max_exponent))
        # Both products as vector-matrix products over contiguous memory (twice as fast as K @ v).
        return K, K.transpose(-1, -2).contiguous()

    K, KT = kernel()
    u = a.expand_as(f).clone()
    v = torch.ones_like(g) * kv
    for step in range(1, iterations + 1):
        u = a / (v[..., None, :] @ KT)[..., 0, :].clamp_min(tiny)
        v = b / (u[..., None, :] @ K)[..., 0, :].clamp_min(tiny)
        if step == iterations:
            break
        if step % check_every == 0:
            row_error = (u * (v[..., None, :] @ KT)[..., 0, :] - a).abs().sum(-1)  # (B, H)
            if bool(row_error.max() <= tolerance):
                break
        log_u = torch.log(u.clamp_min(tiny)).masked_fill(~qv, 0.0)
        log_v = torch.log(v.clamp_min(tiny)).masked_fill(~kv, 0.0)
        if bool(torch.maximum(log_u.abs().amax(), log_v.abs().amax()) > log_tau):
            f = f + epsilon * log_u
            g = g + epsilon * log_v
            K, KT = kernel()
            u = torch.ones_like(u) * qv
            v = torch.ones_like(v) * kv
    return u[..., :, None] * K * v[..., None, :]


def optimal_transport(
    queries: Tensor,
    keys: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    epsilon: float = 0.01,
    iterations: int = 50,
) -> Tensor:
    """Entropic OT cost Σ_ij π*_ij C_ij with C = 1 - cos; the plan π* is detached -> (B, H).

    By the envelope theorem the gradient of the (regularised) OT value with respect to the cost
    is the optimal plan, so backward need not unroll the Sinkhorn iterations.
    """
    cost = cosine_cost(queries, keys)  # (B, H, Nq, Nk)
    with torch.no_grad():
        plan = sinkhorn_plan(cost.detach(), q_valid, k_valid, epsilon, iterations)
    return (plan.to(cost.dtype) * cost).sum((-1, -2))


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


def identity_conditional_transport(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, rho: float = 0.5
) -> Tensor:
    """Parameter-free CT (navigator = critic = L2 normalisation) -> (B, H).

    A diagnostic that is comparable across models, including those trained without a CT critic.
    """
    q_unit = F.normalize(queries.float(), dim=-1)
    k_unit = F.normalize(keys.float(), dim=-1)
    return conditional_transport(q_unit, k_unit, q_unit, k_unit, q_valid, k_valid, rho)


# ----------------------------------------------------------------------------------------------
# Helper networks (shared by all heads of one attention module)
# ----------------------------------------------------------------------------------------------


class Highway(nn.Module):
    """y = t ⊙ ReLU(W_h x) + (1 - t) ⊙ x with t = σ(W_t x); both gates from one fused matmul."""

    def __init__(self, dim: int):
        super().__init__()
        self.gates = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        transform, carry_logit = self.gates(x).chunk(2, dim=-1)
        t = torch.sigmoid(carry_logit)
        return t * F.relu(transform) + (1.0 - t) * x


def _mlp(d_in: int, hidden: int, d_out: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), activation, nn.Linear(hidden, d_out))


class HeadAligner(nn.Module):
    """The alignment distance of one attention module; helper networks shared by its heads.

    ``forward(queries, keys, q_valid, k_valid)`` returns the (B, H) distance. For ``gan`` this is
    the discriminator loss (it rises towards 2·log 2 as queries and keys become indistinguishable).

    ``fused`` (default True) runs CT and GAN through the hand-fused forward/backward of
    :mod:`vqa_align.alignment_kernels`; False runs the plain modules under autograd (the
    reference the fused path is tested against; same values and gradients).
    """

    def __init__(self, head_dim: int, config: AlignmentConfig, fused: bool = True):
        super().__init__()
        self.method = config.method
        self.fused = fused
        self.helper_precision = config.helper_precision
        self.rho = config.ct_rho
        self.ot_epsilon = config.ot_epsilon
        self.ot_iterations = config.ot_iterations
        if self.method == "ct":
            self.navigator = _mlp(head_dim, config.helper_hidden, config.helper_out, nn.ReLU())
            self.critic = nn.Sequential(
                Highway(head_dim), _mlp(head_dim, config.helper_hidden, config.helper_out, nn.ReLU())
            )
        elif self.method == "gan":
            self.discriminator = nn.Sequential(
                Highway(head_dim),
                _mlp(head_dim, config.helper_hidden, 1, nn.LeakyReLU(config.gan_leaky_slope)),
            )
        elif self.method not in ("ot", "none"):
            raise ValueError(f"unknown alignment method {self.method!r}")

    def forward(self, queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
        sizes = [queries.shape[-2], keys.shape[-2]]  # split() backward is one cat, not zeros + copies
        if self.method == "ct" and self.fused:
            return fused_conditional_transport(
                queries, keys, q_valid, k_valid, self.navigator, self.critic, self.rho, self.helper_precision
            )
        if self.method == "ct":
            # Queries and keys go through each helper in ONE call (concatenated along positions).
            both = torch.cat([queries, keys], dim=-2)  # (B, H, Nq + Nk, d)
            nav = F.normalize(self.navigator(both), dim=-1)
            crit = F.normalize(call_with_reversed_parameters(self.critic, both), dim=-1)
            (nav_q, nav_k), (crit_q, crit_k) = nav.split(sizes, dim=-2), crit.split(sizes, dim=-2)
            return conditional_transport(nav_q, nav_k, crit_q, crit_k, q_valid, k_valid, self.rho)
        if self.method == "gan" and self.fused:
            return fused_adversarial_loss(queries, keys, q_valid, k_valid, self.discriminator, self.helper_precision)
        if self.method == "gan":
            logits = self.discriminator(reverse_gradient(torch.cat([queries, keys], dim=-2))).squeeze(-1)
            logits_q, logits_k = logits.split(sizes, dim=-1)
            return adversarial_loss(logits_q, logits_k, q_valid, k_valid)
        if self.method == "ot":
            return optimal_transport(queries, keys, q_valid, k_valid, self.ot_epsilon, self.ot_iterations)
        raise RuntimeError("HeadAligner with method 'none' should not be called")


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


def summarize_mmd(diagnostics: list[ModuleDiagnostics]) -> dict[str, float]:
    """Mean MMD² over samples and heads, per module kind, plus the paper's summed-over-heads total."""
    by_kind: dict[str, list[float]] = {}
    total = 0.0
    for diag in diagnostics:
        by_kind.setdefault(diag.kind, []).append(diag.mmd2.mean().item())
        total += diag.mmd2.sum(-1).mean().item()
    summary = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    summary["sum_over_heads_and_layers"] = total
    return summary


# ----------------------------------------------------------------------------------------------
# Re-export of the conversion API (vqa_align.conversion). Lazy (PEP 562): conversion imports this
# module, so an eager import here would be circular whichever of the two is imported first.
# ----------------------------------------------------------------------------------------------

_CONVERSION_API = ("convert_to_alignment", "AlignmentHandle", "UnsupportedAttentionError", "find_attention", "attention_kind")


def __getattr__(name: str):  # noqa: ANN202 - module-level attribute hook
    if name in _CONVERSION_API:
        from vqa_align import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
