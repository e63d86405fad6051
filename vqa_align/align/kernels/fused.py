"""Fused forward/backward of the CT and GAN aligners (the training hot path of alignment attention).

The plain implementations in :mod:`vqa_align.align.distances` (helper ``nn.Module``\\ s + the pure
distance functions, run by autograd) are the reference; these functions compute the same values
and gradients with hand-written backward passes (checked in ``tests/test_fused_paths.py``). Why:
the helpers run on every head's copy of every position, B·H·(Nq + Nk) rows (102,400 for one
MCAN-small decoder self-attention at batch 64), so their cost is dominated by elementwise passes
over those rows and by autograd's bookkeeping, not by arithmetic. The fused versions

- run every helper layer for queries and keys together as one matmul over all rows (all query
  rows, then all key rows), keeping every (R, ·) tensor contiguous;
- do the elementwise work between the matmuls in place where they can, with the bias-gradient
  column sums taken in the same step (the functions below, PyTorch ops on any device);
- for CT, never form softmaxes: the navigator outputs are unit vectors, so the logits lie in
  [-1, 1] and E = exp(S) is safe without max-subtraction; both transport plans are E divided by its
  row or column sums, and the backward pass needs only E, the cost matrix and four vectors;
- save only what the backward pass reads, and reuse buffers in place once they are consumed;
- optionally run in bf16 (``helper_precision``), with sums and the returned distance in fp32.

Gradient directions are the paper's (see ``shared/ALIGNMENT.md``): the CT critic's parameter
gradients are negated (it ascends); the GAN discriminator's input gradient is negated (a gradient
reversal on q and k).

Shapes follow :mod:`vqa_align.align.aligner`: queries (B, H, Nq, d), keys (B, H, Nk, d), q_valid
(B, Nq) bool, k_valid (B, Nk) bool; both return a (B, H) distance. Elementwise helpers take
contiguous 2-D ``(rows, width)`` tensors of one dtype and may overwrite their first argument (it is
consumed); column sums and norms come back in the accumulation dtype (fp32 for bf16/fp32 inputs,
fp64 for fp64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.align.kernels.common import apply_adversarial, apply_conditional_transport, refuse_double_backward

NORM_EPS = 1e-12  # F.normalize's default: x / max(|x|, eps)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums, norms and the aligners' distances: at least fp32."""
    return torch.promote_types(dtype, torch.float32)

def _concat_rows(queries: Tensor, keys: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, Nq, d), (B, H, Nk, d) -> (B·H·Nq + B·H·Nk, d) contiguous rows in ``dtype``: every
    query row, then every key row, so that each half is a contiguous (B, H, N, d) block."""
    n_query_rows = queries.numel() // queries.shape[-1]
    rows = queries.new_empty(n_query_rows + keys.numel() // keys.shape[-1], queries.shape[-1], dtype=dtype)
    rows[:n_query_rows].view(queries.shape).copy_(queries)  # one pass each, cast included
    rows[n_query_rows:].view(keys.shape).copy_(keys)
    return rows


def _split_rows(rows: Tensor, batch: int, heads: int, n_queries: int) -> tuple[Tensor, Tensor]:
    """(R, c) rows of :func:`_concat_rows` -> contiguous (B, H, Nq, c), (B, H, Nk, c) views."""
    n_query_rows, width = batch * heads * n_queries, rows.shape[-1]
    return rows[:n_query_rows].view(batch, heads, n_queries, width), rows[n_query_rows:].view(batch, heads, -1, width)


# ----------------------------------------------------------------------------------------------
# Elementwise steps between the helpers' matmuls
# ----------------------------------------------------------------------------------------------


def linear_activation(x: Tensor, weight: Tensor, bias: Tensor, slope: float) -> Tensor:
    """leaky_relu(x Wᵀ + b, slope) for rows x (R, in): slope 0 is a ReLU."""
    y = torch.addmm(bias, x, weight.t())
    return y.relu_() if slope == 0.0 else F.leaky_relu_(y, slope)


def linear_normalize(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b -> (y / max(|y|, eps) row-wise, the clamped norms (R,) in the accumulation dtype)."""
    y = torch.addmm(bias, x, weight.t())
    norms = torch.linalg.vector_norm(y, dim=-1, dtype=accumulation_dtype(y.dtype)).clamp_min_(NORM_EPS)
    return y.mul_(norms.reciprocal()[:, None]), norms


def normalize_backward(grad: Tensor, unit: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of the normalisation in :func:`linear_normalize`: (grad - u (u·grad)) / |y| where
    |y| > eps, else grad / eps -> (dL/dy (R, w), its column sums (w,): the bias gradient)."""
    along = torch.linalg.vecdot(unit, grad, dim=-1).to(norms.dtype).masked_fill_(norms <= NORM_EPS, 0.0)  # (R,)
    grad = grad.addcmul_(unit, along[:, None], value=-1.0).mul_(norms.reciprocal()[:, None])
    return grad, grad.sum(0, dtype=norms.dtype)


def leaky_relu_backward(grad: Tensor, activated: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """grad ⊙ (1 where activated > 0 else slope), for ``activated`` the (leaky) ReLU's output.

    -> (dL/d pre-activation (R, w), its column sums (w,): the bias gradient of that layer).
    """
    grad = torch.ops.aten.leaky_relu_backward(grad, activated, slope, True)
    return grad, grad.sum(0, dtype=accumulation_dtype(grad.dtype))


def highway_forward(rows: Tensor, gate_w: Tensor, gate_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y = t ⊙ relu(W_h x + b_h) + (1 - t) ⊙ x, t = σ(W_t x + b_t), x = rows (R, d).

    ``gate_w`` (2d, d) / ``gate_b`` (2d,) = [W_h; W_t] as in :class:`~vqa_align.align.distances.layers.Highway`.
    -> (y, W_h x + b_h, t), what :func:`highway_backward_elementwise` needs. The two halves are separate
    matmuls so that every (R, d) tensor is contiguous (elementwise work on column slices of one
    (R, 2d) output is 2-4x slower on the CPU).
    """
    d = rows.shape[-1]
    transform = torch.addmm(gate_b[:d], rows, gate_w[:d].t())  # (R, d)
    gate = torch.addmm(gate_b[d:], rows, gate_w[d:].t()).sigmoid_()  # (R, d)
    return torch.addcmul(rows, gate, torch.relu(transform).sub_(rows)), transform, gate


def highway_backward_elementwise(
    grad_out: Tensor, gate: Tensor, transform: Tensor, rows: Tensor, input_sign: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`highway_forward` up to the highway's matmuls, with g = dL/dy:

    -> (input_sign · g ⊙ (1 - t)   the direct path to x (-1: a gradient reversal on x),
        g ⊙ t ⊙ [transform > 0]    dL/dtransform,
        g ⊙ (relu(transform) - x) ⊙ t ⊙ (1 - t)   dL/d(gate pre-activation),
        the column sums of the last two, concatenated (2d,)).
    """
    if input_sign not in (1.0, -1.0):
        raise ValueError(f"input_sign must be +1 or -1, got {input_sign}")
    grad_activated = grad_out * gate
    grad_transform = torch.ops.aten.threshold_backward(grad_activated, transform, 0.0)
    grad_gate = torch.ops.aten.sigmoid_backward(grad_out * torch.relu(transform).sub_(rows), gate)
    direct = grad_out.sub_(grad_activated) if input_sign == 1.0 else grad_activated.sub_(grad_out)
    acc = accumulation_dtype(grad_out.dtype)
    return direct, grad_transform, grad_gate, torch.cat([grad_transform.sum(0, dtype=acc), grad_gate.sum(0, dtype=acc)])


def _mask_factor(valid: Tensor) -> Tensor | None:
    """valid (B, N) -> a (B, N) 0/1 factor, or None on the CPU when nothing is padded.

    On accelerators the check itself would be a host sync, so the factor is always applied there.
    """
    if valid.device.type == "cpu" and bool(valid.all()):
        return None
    return valid


def transport_forward(
    logits: Tensor, cost_dots: Tensor, q_valid: Tensor, k_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The elementwise part of the CT forward pass, on (B, H, Nq, Nk) matrices.

    ``logits`` = S = f(q)·f(k), ``cost_dots`` = g(q)·g(k). -> (E = exp(S) with padded pairs zeroed,
    C = 1 - cost_dots, the row sums (B, H, Nq) and column sums (B, H, Nk) of E, and those of
    E ⊙ C), sums in the accumulation dtype. S lies in [-1, 1] (unit vectors): exp needs no
    max-subtraction.
    """
    e = logits.exp_()
    q_factor, k_factor = _mask_factor(q_valid), _mask_factor(k_valid)
    if q_factor is not None:
        e.mul_(q_factor[:, None, :, None])
    if k_factor is not None:
        e.mul_(k_factor[:, None, None, :])
    cost = cost_dots.neg_().add_(1.0)
    acc = accumulation_dtype(e.dtype)
    e_cost = e * cost
    return e, cost, e.sum(-1, dtype=acc), e.sum(-2, dtype=acc), e_cost.sum(-1, dtype=acc), e_cost.sum(-2, dtype=acc)


def transport_backward(
    e: Tensor, cost: Tensor, alpha: Tensor, beta: Tensor, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """The elementwise part of the CT backward pass -> (P, dS), (B, H, Nq, Nk) each:
    P_ij = E_ij (α_i + β_j) and dS_ij = P_ij C_ij - E_ij (a_i + b_j); α, a (B, H, Nq), β, b (B, H, Nk)."""
    dt = e.dtype  # the small vectors are cast before broadcasting to (B, H, Nq, Nk)
    plan = e * (alpha.to(dt)[..., :, None] + beta.to(dt)[..., None, :])
    centre = a.to(dt)[..., :, None] + b.to(dt)[..., None, :]
    return plan, (plan * cost).addcmul_(e, centre, value=-1.0)



def highway_backward(
    grad_out: Tensor, rows: Tensor, gate_w: Tensor, transform: Tensor, gate: Tensor, input_sign: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`highway_forward` -> (input_sign · dL/dx, dL/dW (2d, d), dL/db (2d,)).

    ``input_sign`` is +1, or -1 for a gradient reversal on x. Consumes ``grad_out`` (R, d).
    """
    d = rows.shape[-1]
    grad_rows, grad_transform, grad_gate, grad_b = highway_backward_elementwise(
        grad_out, gate, transform, rows, input_sign
    )
    grad_rows.addmm_(grad_transform, gate_w[:d], alpha=input_sign).addmm_(grad_gate, gate_w[d:], alpha=input_sign)
    grad_w = torch.cat([grad_transform.t() @ rows, grad_gate.t() @ rows])
    return grad_rows, grad_w, grad_b


def _direction_weights(
    q_valid: Tensor, k_valid: Tensor, q_scale: float, k_scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """q_scale / n on valid queries, k_scale / m on valid keys -> (B, 1, Nq), (B, 1, Nk)."""
    n = q_valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)  # (B, 1)
    m = k_valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    return (q_valid.to(dtype) * (q_scale / n))[:, None, :], (k_valid.to(dtype) * (k_scale / m))[:, None, :]


# ----------------------------------------------------------------------------------------------
# Conditional transport
# ----------------------------------------------------------------------------------------------


def _ct_helpers_forward(rows: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The CT helpers layer by layer over all rows (R, d) -> nav, nav_norm, crit, crit_norm and the
    activations the backward pass reads."""
    nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2 = weights
    # Navigator: Linear-ReLU-Linear-normalise. Critic: highway, Linear-ReLU-Linear-normalise.
    nav_hidden = linear_activation(rows, nav_w1, nav_b1, 0.0)  # (R, hn)
    nav, nav_norm = linear_normalize(nav_hidden, nav_w2, nav_b2)  # (R, r), (R,)
    highway, transform, gate = highway_forward(rows, gate_w, gate_b)  # (R, d) each
    crit_hidden = linear_activation(highway, crit_w1, crit_b1, 0.0)  # (R, hc)
    crit, crit_norm = linear_normalize(crit_hidden, crit_w2, crit_b2)  # (R, r), (R,)
    return nav, nav_norm, crit, crit_norm, (rows, nav_hidden, transform, gate, highway, crit_hidden)


def _ct_helpers_backward(
    grad_nav: Tensor, grad_crit: Tensor, nav: Tensor, nav_norm: Tensor, crit: Tensor, crit_norm: Tensor,
    activations: tuple[Tensor, ...], weights: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """Backward of :func:`_ct_helpers_forward` from dD/dnav and dD/dcrit (R, r), both consumed ->
    dD/drows (R, d) and the ten weight and bias gradients (the critic's not yet negated)."""
    rows, nav_hidden, transform, gate, highway, crit_hidden = activations
    nav_w1, _, nav_w2, _, gate_w, _, crit_w1, _, crit_w2, _ = weights
    grad_crit.neg_()  # dC = -d(g·g)
    grad_nav, grad_nav_b2 = normalize_backward(grad_nav, nav, nav_norm)  # (R, r), (r,)
    grad_crit, grad_crit_b2 = normalize_backward(grad_crit, crit, crit_norm)
    # Critic.
    grad_crit_w2 = grad_crit.t() @ crit_hidden
    grad_crit_hidden, grad_crit_b1 = leaky_relu_backward(grad_crit @ crit_w2, crit_hidden, 0.0)  # (R, hc)
    grad_crit_w1 = grad_crit_hidden.t() @ highway
    grad_rows, grad_gate_w, grad_gate_b = highway_backward(
        grad_crit_hidden @ crit_w1, rows, gate_w, transform, gate
    )  # (R, d)
    # Navigator.
    grad_nav_w2 = grad_nav.t() @ nav_hidden
    grad_nav_hidden, grad_nav_b1 = leaky_relu_backward(grad_nav @ nav_w2, nav_hidden, 0.0)  # (R, hn)
    grad_nav_w1 = grad_nav_hidden.t() @ rows
    grad_rows.addmm_(grad_nav_hidden, nav_w1)  # (R, d)
    return (
        grad_rows, grad_nav_w1, grad_nav_b1, grad_nav_w2, grad_nav_b2,
        grad_gate_w, grad_gate_b, grad_crit_w1, grad_crit_b1, grad_crit_w2, grad_crit_b2,
    )  # fmt: skip


class _CTMeta(NamedTuple):
    """What _FusedConditionalTransport's backward needs besides tensors."""

    n_queries: int
    q_dtype: torch.dtype
    k_dtype: torch.dtype
    w_dtype: torch.dtype


class _FusedConditionalTransport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, rho, dtype, *weights):  # type: ignore[override]
        # weights: nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2
        batch, heads, n_queries, _ = queries.shape
        ctx.meta = _CTMeta(n_queries, queries.dtype, keys.dtype, weights[0].dtype)
        weights = tuple(t.to(dtype) for t in weights)
        nav, nav_norm, crit, crit_norm, activations = _ct_helpers_forward(
            _concat_rows(queries, keys, dtype), weights  # (R, d), R = B·H·(Nq + Nk)
        )

        # Transport. S = f(q) f(k)ᵀ lies in [-1, 1], so E = exp(S) needs no max-subtraction; with
        # padded pairs zeroed, the forward plan is E over its row sums and the backward plan E over
        # its column sums. Cost C = 1 - g(q) g(k)ᵀ.
        nav_q, nav_k = _split_rows(nav, batch, heads, n_queries)  # (B, H, Nq, r), (B, H, Nk, r)
        crit_q, crit_k = _split_rows(crit, batch, heads, n_queries)
        logits = torch.matmul(nav_q, nav_k.transpose(-1, -2))  # S (B, H, Nq, Nk)
        cost_dots = torch.matmul(crit_q, crit_k.transpose(-1, -2))  # g(q)·g(k)
        # E = exp(S) masked, C = 1 - g·g; sums in the accumulation dtype (fp32 at least).
        e, cost, row_sum, col_sum, row_cost, col_cost = transport_forward(logits, cost_dots, q_valid, k_valid)
        acc = row_sum.dtype
        row_sum, col_sum = row_sum.clamp_min_(torch.finfo(acc).tiny), col_sum.clamp_min_(torch.finfo(acc).tiny)
        forward_cost = row_cost / row_sum  # (B, H, Nq): Σ_j π(k_j|q_i) c_ij; row_sum is 0 only at padded rows
        backward_cost = col_cost / col_sum  # (B, H, Nk): Σ_i π(q_i|k_j) c_ij
        q_weight, k_weight = _direction_weights(q_valid, k_valid, rho, 1.0 - rho, acc)  # ρ/n, (1-ρ)/m
        distance = (forward_cost * q_weight).sum(-1) + (backward_cost * k_weight).sum(-1)  # (B, H)

        ctx.save_for_backward(
            nav, nav_norm, crit, crit_norm, e, cost, row_sum, col_sum, forward_cost, backward_cost, q_weight,
            k_weight, *activations, *weights,
        )  # fmt: skip
        return distance

    @staticmethod
    def backward(ctx, grad_distance):  # type: ignore[override]
        refuse_double_backward("CT")
        (
            nav, nav_norm, crit, crit_norm, e, cost, row_sum, col_sum, forward_cost, backward_cost, q_weight,
            k_weight, *saved,
        ) = ctx.saved_tensors  # fmt: skip
        meta = ctx.meta
        batch, heads = row_sum.shape[:2]
        grad_distance = grad_distance.to(row_sum.dtype)[..., None]  # (B, H, 1)

        # With α_i = g·w_i / rowsum_i and β_j = g·w_j / colsum_j (g = dLoss/dD):
        #   dD/dC_ij = E_ij (α_i + β_j)                              (the combined transport plan)
        #   dD/dS_ij = E_ij (α_i (C_ij - fc_i) + β_j (C_ij - bc_j))  (backward of both softmaxes)
        alpha = grad_distance * q_weight / row_sum  # (B, H, Nq)
        beta = grad_distance * k_weight / col_sum  # (B, H, Nk)
        plan, grad_logits = transport_backward(e, cost, alpha, beta, alpha * forward_cost, beta * backward_cost)
        grad_nav, grad_crit = torch.empty_like(nav), torch.empty_like(crit)  # (R, r) each, the layout of rows
        for grad, factor, unit in ((grad_nav, grad_logits, nav), (grad_crit, plan, crit)):
            unit_q, unit_k = _split_rows(unit, batch, heads, meta.n_queries)
            out_q, out_k = _split_rows(grad, batch, heads, meta.n_queries)
            torch.matmul(factor, unit_k, out=out_q)  # (B, H, Nq, r)
            torch.matmul(factor.transpose(-1, -2), unit_q, out=out_k)  # (B, H, Nk, r)
        activations, weights = saved[:6], saved[6:]
        grad_rows, *weight_grads = _ct_helpers_backward(
            grad_nav, grad_crit, nav, nav_norm, crit, crit_norm, activations, weights
        )
        grad_q, grad_k = _split_rows(grad_rows, batch, heads, meta.n_queries)
        # The critic ascends the cost: its gradients negated.
        weight_grads = (*weight_grads[:4], *(g.neg() for g in weight_grads[4:]))
        return (
            grad_q.to(meta.q_dtype), grad_k.to(meta.k_dtype), None, None, None, None,
            *(g.to(meta.w_dtype) for g in weight_grads),
        )  # fmt: skip


def fused_conditional_transport(
    queries: Tensor,
    keys: Tensor,
    q_valid: Tensor,
    k_valid: Tensor,
    navigator: nn.Sequential,
    critic: nn.Sequential,
    rho: float,
    precision: str = "fp32",
) -> Tensor:
    """CT of :class:`~vqa_align.align.aligner.HeadAligner` (method ``ct``) as one fused op -> (B, H) fp32.

    ``navigator`` = Linear-ReLU-Linear, ``critic`` = (Highway, Linear-ReLU-Linear), as built by
    ``HeadAligner``; equals ``conditional_transport`` on their L2-normalised outputs, with the
    critic's parameter gradients negated. ``precision``: see
    :func:`~vqa_align.align.kernels.common.compute_dtype`.
    """
    return apply_conditional_transport(_FusedConditionalTransport, queries, keys, q_valid, k_valid, navigator, critic,
                                       rho, precision)


# ----------------------------------------------------------------------------------------------
# Adversarial (GAN) alignment
# ----------------------------------------------------------------------------------------------


class _FusedAdversarial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, slope, dtype, *weights):  # type: ignore[override]
        # weights: gate_w, gate_b, w1, b1, w2, b2 (highway; Linear-LeakyReLU; Linear to one logit)
        batch, heads, n_queries, _ = queries.shape
        ctx.meta = (n_queries, slope, queries.dtype, keys.dtype, weights[0].dtype)
        rows = _concat_rows(queries, keys, dtype)  # (R, d), R = B·H·(Nq + Nk)
        gate_w, gate_b, w1, b1, w2, b2 = (t.to(dtype) for t in weights)
        highway, transform, gate = highway_forward(rows, gate_w, gate_b)  # (R, d) each
        hidden = linear_activation(highway, w1, b1, slope)  # (R, h); its sign is the pre-activation's
        logits = torch.addmm(b2, hidden, w2.t()).to(accumulation_dtype(dtype)).squeeze(-1)  # (R,)
        logits_q, logits_k = (t.squeeze(-1) for t in _split_rows(logits[:, None], batch, heads, n_queries))  # (B, H, N)

        # BCE(D(k), 1) + BCE(D(q), 0) = softplus(-D(k)) + softplus(D(q)), as masked means.
        q_weight, k_weight = _direction_weights(q_valid, k_valid, 1.0, 1.0, logits.dtype)  # 1/n, 1/m
        loss = (F.softplus(logits_q) * q_weight).sum(-1) + (F.softplus(-logits_k) * k_weight).sum(-1)  # (B, H)
        ctx.save_for_backward(logits, q_weight, k_weight, rows, transform, gate, highway, hidden, gate_w, w1, w2)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        refuse_double_backward("GAN")
        logits, q_weight, k_weight, rows, transform, gate, highway, hidden, gate_w, w1, w2 = ctx.saved_tensors
        n_queries, slope, q_dtype, k_dtype, param_dtype = ctx.meta
        batch, heads = grad_loss.shape
        # d softplus(x)/dx = σ(x); d softplus(-x)/dx = σ(x) - 1.
        upstream = grad_loss.to(logits.dtype)[..., None]  # (B, H, 1)
        probs_q, probs_k = _split_rows(torch.sigmoid(logits)[:, None], batch, heads, n_queries)  # (B, H, N, 1)
        grad_logits = torch.cat([
            (probs_q.squeeze(-1) * q_weight * upstream).flatten(), ((probs_k.squeeze(-1) - 1.0) * k_weight * upstream).flatten()
        ])  # (R,)

        grad_logits = grad_logits.to(rows.dtype)[:, None]  # (R, 1)
        grad_w2, grad_b2 = grad_logits.t() @ hidden, grad_logits.sum(0)
        grad_hidden_pre, grad_b1 = leaky_relu_backward(grad_logits * w2, hidden, slope)  # (R, h)
        grad_w1 = grad_hidden_pre.t() @ highway
        # The projections ascend the discriminator loss: a gradient reversal on q and k (sign -1).
        grad_rows, grad_gate_w, grad_gate_b = highway_backward(
            grad_hidden_pre @ w1, rows, gate_w, transform, gate, input_sign=-1.0
        )  # (R, d)
        grad_q, grad_k = _split_rows(grad_rows, batch, heads, n_queries)
        weight_grads = (grad_gate_w, grad_gate_b, grad_w1, grad_b1, grad_w2, grad_b2)
        return (grad_q.to(q_dtype), grad_k.to(k_dtype), None, None, None, None, *(g.to(param_dtype) for g in weight_grads))


def fused_adversarial_loss(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, discriminator: nn.Sequential, precision: str = "fp32"
) -> Tensor:
    """GAN loss of :class:`~vqa_align.align.aligner.HeadAligner` (method ``gan``) as one fused op -> (B, H) fp32.

    ``discriminator`` = (Highway, Linear-LeakyReLU-Linear to one logit), as built by ``HeadAligner``;
    equals ``adversarial_loss`` of its logits with q and k behind a gradient reversal.
    """
    return apply_adversarial(_FusedAdversarial, queries, keys, q_valid, k_valid, discriminator, precision)
