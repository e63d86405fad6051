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
- ``ot``: entropic OT with a detached Sinkhorn plan, iterated to a marginal-error tolerance (envelope
  theorem); gradients reach q/k via the cost.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.align.kernels.fused import fused_adversarial_loss, fused_conditional_transport, triton_kernels_for
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


# The OT costs (``AlignmentConfig.ot_cost``) and the factor that maps each onto [0, 2], the scale ε
# is given on: |q̂ - k̂|² = 2 (1 - cos) lies in [0, 4].
OT_COST_SCALES = {"cosine": 1.0, "sqeuclidean": 2.0}


def ot_cost_matrix(queries: Tensor, keys: Tensor, kind: str = "cosine") -> Tensor:
    """The OT cost between L2-normalised queries and keys -> (B, H, Nq, Nk): ``cosine`` 1 - cos in
    [0, 2], ``sqeuclidean`` |q/|q| - k/|k||² in [0, 4] (computed as 2 (1 - cos), exact for unit
    vectors)."""
    if kind not in OT_COST_SCALES:
        raise ValueError(f"OT cost must be one of {tuple(OT_COST_SCALES)}, got {kind!r}")
    return OT_COST_SCALES[kind] * cosine_cost(queries, keys)


# Two accelerations of Sinkhorn at small ε, both measured on clustered and random problems at
# ε = 0.01 (marginal error 1e-4): plain Sinkhorn needed 60-5,000 iterations.
# - Over-relaxation (Thibault et al. 2017, "Overrelaxed Sinkhorn-Knopp"): u <- u^(1-ω) (a / Kv)^ω;
#   ω = 1 is plain Sinkhorn. ω = 1.8 alone: 50-190 iterations on most problems, but 1,500-2,400 on
#   clustered ones whose clusters hold different shares of queries and keys (mass must cross
#   between clusters, where the kernel is exp(-Δ/ε)). A (sample, head) whose error grows between
#   two checks falls back to ω = 1, which converges monotonically.
# - ε-scaling: ε runs through SINKHORN_EPSILON_START · 2^-k (SINKHORN_STAGE_ITERATIONS iterations
#   each, potentials carried over) down to ε, so the potentials are nearly right before the
#   slow small-ε regime. With both: 100-260 iterations on most problems tried; a few clustered
#   (sample, head)s in a batch of 64 still need 1,000-5,000, which is why converged problems are
#   dropped from the iteration (sinkhorn_plan).
SINKHORN_OVERRELAXATION = 1.8
SINKHORN_EPSILON_START = 1.0  # half the cost range [0, 2]
SINKHORN_STAGE_ITERATIONS = 10


def sinkhorn_plan(
    cost: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    epsilon: float = 0.01,
    iterations: int = 2000,
    tolerance: float = 1e-3,
    check_every: int = 10,
    overrelaxation: float = SINKHORN_OVERRELAXATION,
    epsilon_start: float | None = SINKHORN_EPSILON_START,
) -> tuple[Tensor, Tensor]:
    """Entropic OT plan between uniform distributions over the valid queries and keys.

    Stabilised ("absorbed") Sinkhorn (Schmitzer 2019): the plan is kept as
    π_ij = u_i · exp((f_i + g_j − C_ij)/ε) · v_j with log-domain potentials f, g and exp-domain
    scalings u, v. Each iteration is two matrix-vector products (no logsumexp over the full
    matrix); whenever a scaling leaves [1/τ, τ] it is absorbed into the potentials and the kernel
    is recomputed, so nothing overflows or underflows for small ε. The potentials start at the
    c-transforms (f_i = min_j C_ij, g_j = min_i C_ij − f_i), so every row and column of the first
    kernel holds an entry equal to 1. The updates are over-relaxed (``overrelaxation`` = ω) and ε
    is scaled down from ``epsilon_start`` (None: no scaling); see SINKHORN_OVERRELAXATION. Runs in
    at least fp32. Padded positions carry zero mass.

    Convergence: at the final ε, every ``check_every`` iterations the row marginals are measured
    (the column marginals are exact after each v update); the loop stops once the L1 error of
    every (sample, head) is <= ``tolerance`` (total mass is 1), or after ``iterations`` iterations
    in all (the ε-scaling stages included).

    Args:
        cost: (B, H, Nq, Nk); q_valid (B, Nq); k_valid (B, Nk).
    Returns:
        plan (B, H, Nq, Nk), rows summing to 1/n and columns to 1/m over valid positions, and the
        last measured row-marginal L1 error (B, H) (measured after the last iteration).
    """
    if not 1.0 <= overrelaxation < 2.0:
        raise ValueError(f"overrelaxation must lie in [1, 2), got {overrelaxation}")
    dtype = torch.promote_types(cost.dtype, torch.float32)
    batch, heads, n_q, n_k = cost.shape
    problems = batch * heads
    # Every (sample, head) is one problem; rows of (P, ...) tensors, P = B·H.
    q_rows = q_valid[:, None, :].expand(batch, heads, n_q).reshape(problems, n_q)  # (P, Nq)
    k_rows = k_valid[:, None, :].expand(batch, heads, n_k).reshape(problems, n_k)  # (P, Nk)
    a = q_rows.to(dtype) / q_rows.sum(-1, keepdim=True).clamp_min(1).to(dtype)  # uniform over valid queries
    b = k_rows.to(dtype) / k_rows.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    pair_valid = q_rows[:, :, None] & k_rows[:, None, :]  # (P, Nq, Nk)
    big = torch.finfo(dtype).max / 4
    masked_cost = cost.to(dtype).reshape(problems, n_q, n_k).masked_fill(~pair_valid, big)
    f = masked_cost.amin(-1).masked_fill(~q_rows, 0.0)  # (P, Nq)
    g = (masked_cost - f[..., None]).amin(-2).masked_fill(~k_rows, 0.0)  # (P, Nk)
    log_tau = 0.25 * math.log(torch.finfo(dtype).max)  # absorb before u·K·v can overflow
    tiny = torch.finfo(dtype).tiny
    max_exponent = 0.5 * math.log(torch.finfo(dtype).max)
    eps = epsilon if epsilon_start is None else max(epsilon, epsilon_start)  # the current stage's ε

    def kernel() -> tuple[Tensor, Tensor]:
        exponent = (f[:, :, None] + g[:, None, :] - masked_cost) / eps  # -huge at padding
        K = torch.exp(exponent.clamp_max(max_exponent))
        # Both products as vector-matrix products over contiguous memory (twice as fast as K @ v).
        return K, K.transpose(-1, -2).contiguous()

    def relaxed(old: Tensor, new: Tensor) -> Tensor:
        # old^(1-ω) new^ω per problem; padded entries (new = 0) stay 0.
        return new if overrelaxation == 1.0 else old.clamp_min(tiny).pow(1.0 - omega) * new.pow(omega)

    def row_error() -> Tensor:
        return (u * (v[:, None, :] @ KT)[:, 0, :] - a).abs().sum(-1)  # (A,)

    # The problems still iterating are compacted as others converge, so that a few slow ones (some
    # clustered problems need 10x the iterations of the rest) do not keep the whole batch running.
    active = torch.arange(problems, device=cost.device)  # (A,) their indices
    plan_out = torch.zeros(problems, n_q, n_k, dtype=dtype, device=cost.device)
    error_out = torch.zeros(problems, dtype=dtype, device=cost.device)
    K, KT = kernel()
    u, v = q_rows.to(dtype), k_rows.to(dtype)  # 1 on valid positions
    omega = torch.full((problems, 1), overrelaxation, dtype=dtype, device=cost.device)
    last_error = torch.full((problems,), math.inf, dtype=dtype, device=cost.device)
    stage_step = 0
    for step in range(1, iterations + 1):
        u = relaxed(u, a / (v[:, None, :] @ KT)[:, 0, :].clamp_min(tiny))
        v = relaxed(v, b / (u[:, None, :] @ K)[:, 0, :].clamp_min(tiny))
        if step == iterations:
            break
        stage_step += 1
        final = eps == epsilon
        if final and stage_step % check_every == 0:
            error = row_error()
            done = error <= tolerance
            # Over-relaxation is not helping where the error grew: plain Sinkhorn there from now on.
            omega = torch.where((error > last_error)[:, None], torch.ones_like(omega), omega)
            last_error = error
            if bool(done.any()):
                finished = active[done]
                plan_out[finished] = u[done, :, None] * K[done] * v[done, None, :]
                error_out[finished] = error[done]
                keep = ~done
                if not bool(keep.any()):
                    return plan_out.view(cost.shape), error_out.view(batch, heads)
                active, a, b, q_rows, k_rows, masked_cost, f, g, K, KT, u, v, omega, last_error = (
                    t[keep] for t in (active, a, b, q_rows, k_rows, masked_cost, f, g, K, KT, u, v, omega, last_error)
                )
        next_stage = not final and stage_step == SINKHORN_STAGE_ITERATIONS
        log_u = torch.log(u.clamp_min(tiny)).masked_fill(~q_rows, 0.0)
        log_v = torch.log(v.clamp_min(tiny)).masked_fill(~k_rows, 0.0)
        if next_stage or bool(torch.maximum(log_u.abs().amax(), log_v.abs().amax()) > log_tau):
            f = f + eps * log_u  # absorb the scalings into the potentials (the plan is unchanged)
            g = g + eps * log_v
            if next_stage:
                eps, stage_step = max(epsilon, eps / 2), 0
            K, KT = kernel()
            u, v = q_rows.to(dtype), k_rows.to(dtype)
    plan_out[active] = u[:, :, None] * K * v[:, None, :]
    error_out[active] = row_error()
    return plan_out.view(cost.shape), error_out.view(batch, heads)


_warned_unconverged = False


def optimal_transport(
    queries: Tensor,
    keys: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    epsilon: float = 0.01,
    iterations: int = 2000,
    tolerance: float = 1e-3,
    cost: str = "cosine",
) -> Tensor:
    """Entropic OT cost Σ_ij π*_ij C_ij, C = :func:`ot_cost_matrix` ``cost``; the plan π* is
    detached -> (B, H).

    The plan solves the problem at ε on the cost scaled to [0, 2] (so both costs give the same
    plan). Its gradient with respect to q and k is π* : dC, which is the exact gradient of the
    entropic OT value min_π <π, C> - ε' H(π) (envelope theorem; ε' = ε times the cost's scale), so
    backward need not unroll the Sinkhorn iterations. Warns once per process when Sinkhorn stops at
    ``iterations`` without reaching ``tolerance``.
    """
    global _warned_unconverged
    matrix = ot_cost_matrix(queries, keys, cost)  # (B, H, Nq, Nk)
    with torch.no_grad():
        scaled = matrix.detach() / OT_COST_SCALES[cost]  # in [0, 2]
        plan, error = sinkhorn_plan(scaled, q_valid, k_valid, epsilon, iterations, tolerance)
        if not _warned_unconverged and error.device.type == "cpu" and bool(error.max() > tolerance):
            _warned_unconverged = True
            warnings.warn(
                f"OT: Sinkhorn stopped at model.alignment.ot_iterations={iterations} with a marginal error of "
                f"{error.max().item():.2g} > ot_tolerance={tolerance:g}; the OT distance and its gradient are "
                "not converged (raise ot_iterations)",
                RuntimeWarning,
                stacklevel=2,
            )
    return (plan.to(matrix.dtype) * matrix).sum((-1, -2))


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
    :mod:`vqa_align.align.kernels.fused`, or on CUDA through the Triton kernels of
    :mod:`vqa_align.align.kernels.triton` (``config.kernels``: auto / triton / fused); False, or
    ``config.kernels = "reference"``, runs the plain modules under autograd (the reference the
    fast paths are tested against; same values and gradients).
    """

    def __init__(self, head_dim: int, config: AlignmentConfig, fused: bool = True):
        super().__init__()
        self.method = config.method
        self.fused = fused and config.kernels != "reference"
        self.kernels = config.kernels
        self.helper_precision = config.helper_precision
        self.rho = config.ct_rho
        self.ot_epsilon = config.ot_epsilon
        self.ot_iterations = config.ot_iterations
        self.ot_tolerance = config.ot_tolerance
        self.ot_cost = config.ot_cost
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
            triton = triton_kernels_for(self.kernels, queries, keys, transport=True)
            ct = triton.triton_conditional_transport if triton is not None else fused_conditional_transport
            return ct(queries, keys, q_valid, k_valid, self.navigator, self.critic, self.rho, self.helper_precision)
        if self.method == "ct":
            # Queries and keys go through each helper in ONE call (concatenated along positions).
            both = torch.cat([queries, keys], dim=-2)  # (B, H, Nq + Nk, d)
            nav = F.normalize(self.navigator(both), dim=-1)
            crit = F.normalize(call_with_reversed_parameters(self.critic, both), dim=-1)
            (nav_q, nav_k), (crit_q, crit_k) = nav.split(sizes, dim=-2), crit.split(sizes, dim=-2)
            return conditional_transport(nav_q, nav_k, crit_q, crit_k, q_valid, k_valid, self.rho)
        if self.method == "gan" and self.fused:
            triton = triton_kernels_for(self.kernels, queries, keys, transport=False)
            gan = triton.triton_adversarial_loss if triton is not None else fused_adversarial_loss
            return gan(queries, keys, q_valid, k_valid, self.discriminator, self.helper_precision)
        if self.method == "gan":
            logits = self.discriminator(reverse_gradient(torch.cat([queries, keys], dim=-2))).squeeze(-1)
            logits_q, logits_k = logits.split(sizes, dim=-1)
            return adversarial_loss(logits_q, logits_k, q_valid, k_valid)
        if self.method == "ot":
            return optimal_transport(
                queries, keys, q_valid, k_valid, self.ot_epsilon, self.ot_iterations, self.ot_tolerance, self.ot_cost
            )
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
