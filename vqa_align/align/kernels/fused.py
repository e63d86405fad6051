"""Fused forward/backward of the CT and GAN aligners (the training hot path of alignment attention).

The plain implementations in :mod:`vqa_align.align.aligner` (helper ``nn.Module``\\ s + the pure
distance functions, run by autograd) are the reference; these functions compute the same values
and gradients with hand-written backward passes (checked in ``tests/test_fused_paths.py``). Why:
the helpers run on every head's copy of every position, B·H·(Nq + Nk) rows (102,400 for one
MCAN-small decoder self-attention at batch 64), so their cost is dominated by elementwise passes
over those rows and by autograd's bookkeeping, not by arithmetic. The fused versions

- run every helper layer for queries and keys together as one matmul over all rows (all query
  rows, then all key rows), keeping every (R, ·) tensor contiguous;
- do the elementwise work between the matmuls through :mod:`vqa_align.align.kernels.native`: one-pass
  C++ kernels on the CPU (bias adds and activations, the highway mix, the normalisation, the
  transport matrices, with the bias-gradient sums folded in), PyTorch ops elsewhere;
- on CPUs with AMX and bf16 helpers whose widths are multiples of 32, replace all of the above by
  cache-blocked kernels (``csrc/aligner_blocks.cpp``): every helper layer per block of rows, CT's
  transport per (sample, head), the backward recomputing the forward activations; q and k are read
  in their strided (attention) layout and get their gradients in it;
- for CT, never form softmaxes: the navigator outputs are unit vectors, so the logits lie in
  [-1, 1] and E = exp(S) is safe without max-subtraction; both transport plans are E divided by its
  row or column sums, and the backward pass needs only E, the cost matrix and four vectors;
- save only what the backward pass reads, and reuse buffers in place once they are consumed;
- optionally run in bf16 (``helper_precision``), with sums and the returned distance in fp32.

Gradient directions are the paper's (see :mod:`vqa_align.align.aligner`): the CT critic's parameter
gradients are negated (it ascends); the GAN discriminator's input gradient is negated (a gradient
reversal on q and k).

Shapes follow :mod:`vqa_align.align.aligner`: queries (B, H, Nq, d), keys (B, H, Nk, d), q_valid
(B, Nq) bool, k_valid (B, Nk) bool; both return a (B, H) distance.
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa_align.errors import UserError
from vqa_align.align.kernels.native import (
    accumulation_dtype,
    cpu_flags,
    glue_for,
    helper_blocks,
)


def _refuse_double_backward(method: str) -> None:
    """The hand-written backward passes are not differentiable themselves (their kernels record no
    graph): under ``create_graph=True`` (autograd runs backward with grad mode on) they would return
    gradients that silently lack their own gradient, so they refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the fused {method} aligner has no second-order gradient (backward with create_graph=True, e.g. a "
            "gradient penalty); run the plain aligners instead, which support it with the same values and "
            "gradients: set `.fused = False` on every vqa_align.align.aligner.HeadAligner of the model (or "
            "model.alignment.kernels: reference)"
            + (" and run under torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (the fused attention kernels that the "
               "plain CT uses have no second-order gradient either)" if method == "CT" else "")
        )


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


def _row_layout(x: Tensor) -> Tensor:
    """x (B, H, N, d) as the CPU kernels read it: rows of unit stride, any strides between them. The
    attention's q and k (transposed views of (B, N, H·d) projections, or column chunks of the fused
    QKV projection) qualify as they are and are not copied; their gradients come back dense in the
    same (B, N, H, d) memory order."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _highway_backward(
    glue: SimpleNamespace, grad_out: Tensor, rows: Tensor, gate_w: Tensor, transform: Tensor, gate: Tensor,
    input_sign: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the glue's ``highway_forward`` -> (input_sign · dL/dx, dL/dW (2d, d), dL/db (2d,)).

    ``input_sign`` is +1, or -1 for a gradient reversal on x. Consumes ``grad_out`` (R, d).
    """
    d = rows.shape[-1]
    grad_rows, grad_transform, grad_gate, grad_b = glue.highway_backward(grad_out, gate, transform, rows, input_sign)
    grad_rows.addmm_(grad_transform, gate_w[:d], alpha=input_sign).addmm_(grad_gate, gate_w[d:], alpha=input_sign)
    grad_w = torch.cat([grad_transform.t() @ rows, grad_gate.t() @ rows])
    return grad_rows, grad_w, grad_b


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on ``device``: CUDA, or a CPU with
    avx512_bf16 / AMX (oneDNN uses them); elsewhere bf16 would be emulated and slower."""
    if device.type == "cuda":
        return _cuda_has_bf16(device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        return False
    return _cpu_has_bf16()


@functools.cache
def _cuda_has_bf16(index: int) -> bool:  # cached: no device query inside a captured CUDA graph
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _cpu_has_bf16() -> bool:
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: str, queries: Tensor) -> torch.dtype:
    """The dtype the fused helpers run in for ``AlignmentConfig.helper_precision``.

    ``fp32``: at least fp32; ``bf16``: bf16; ``auto``: bf16 where it is native
    (:func:`native_bf16_matmul`) and the inputs are not fp64 (an fp64 model asks for precision),
    else the inputs' dtype (at least fp32).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and queries.dtype != torch.float64 and native_bf16_matmul(queries.device):
        return torch.bfloat16
    if precision in ("fp32", "auto"):
        return torch.promote_types(queries.dtype, torch.float32)
    raise ValueError(f"alignment.helper_precision must be auto, fp32 or bf16, got {precision!r}")


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


def _ct_helpers_forward(rows: Tensor, weights: tuple[Tensor, ...], glue: SimpleNamespace) -> tuple[Tensor, ...]:
    """The CT helpers layer by layer over all rows (R, d) -> nav, nav_norm, crit, crit_norm and the
    activations the backward pass reads."""
    nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2 = weights
    # Navigator: Linear-ReLU-Linear-normalise. Critic: highway, Linear-ReLU-Linear-normalise.
    nav_hidden = glue.linear_activation(rows, nav_w1, nav_b1, 0.0)  # (R, hn)
    nav, nav_norm = glue.linear_normalize(nav_hidden, nav_w2, nav_b2)  # (R, r), (R,)
    highway, transform, gate = glue.highway_forward(rows, gate_w, gate_b)  # (R, d) each
    crit_hidden = glue.linear_activation(highway, crit_w1, crit_b1, 0.0)  # (R, hc)
    crit, crit_norm = glue.linear_normalize(crit_hidden, crit_w2, crit_b2)  # (R, r), (R,)
    return nav, nav_norm, crit, crit_norm, (rows, nav_hidden, transform, gate, highway, crit_hidden)


def _ct_helpers_backward(
    grad_nav: Tensor, grad_crit: Tensor, nav: Tensor, nav_norm: Tensor, crit: Tensor, crit_norm: Tensor,
    activations: tuple[Tensor, ...], weights: tuple[Tensor, ...], glue: SimpleNamespace,
) -> tuple[Tensor, ...]:
    """Backward of :func:`_ct_helpers_forward` from dD/dnav and dD/dcrit (R, r), both consumed ->
    dD/drows (R, d) and the ten weight and bias gradients (the critic's not yet negated)."""
    rows, nav_hidden, transform, gate, highway, crit_hidden = activations
    nav_w1, _, nav_w2, _, gate_w, _, crit_w1, _, crit_w2, _ = weights
    grad_crit.neg_()  # dC = -d(g·g)
    grad_nav, grad_nav_b2 = glue.normalize_backward(grad_nav, nav, nav_norm)  # (R, r), (r,)
    grad_crit, grad_crit_b2 = glue.normalize_backward(grad_crit, crit, crit_norm)
    # Critic.
    grad_crit_w2 = grad_crit.t() @ crit_hidden
    grad_crit_hidden, grad_crit_b1 = glue.leaky_relu_backward(grad_crit @ crit_w2, crit_hidden, 0.0)  # (R, hc)
    grad_crit_w1 = grad_crit_hidden.t() @ highway
    grad_rows, grad_gate_w, grad_gate_b = _highway_backward(
        glue, grad_crit_hidden @ crit_w1, rows, gate_w, transform, gate
    )  # (R, d)
    # Navigator.
    grad_nav_w2 = grad_nav.t() @ nav_hidden
    grad_nav_hidden, grad_nav_b1 = glue.leaky_relu_backward(grad_nav @ nav_w2, nav_hidden, 0.0)  # (R, hn)
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
    blocks: bool  # the cache-blocked CPU kernels run


class _FusedConditionalTransport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, rho, dtype, *weights):  # type: ignore[override]
        # weights: nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2
        batch, heads, n_queries, d = queries.shape
        widths = (d, weights[0].shape[0], weights[6].shape[0], weights[2].shape[0])  # d, hn, hc, r
        blocks = helper_blocks(queries.device, dtype, widths) and queries.dtype in (torch.float32, torch.bfloat16)
        ctx.meta = _CTMeta(n_queries, queries.dtype, keys.dtype, weights[0].dtype, blocks)
        glue = glue_for(queries.device)
        if blocks:  # every helper layer per block of rows in the CPU's cache (csrc/aligner_blocks.cpp)
            queries, keys = _row_layout(queries), _row_layout(keys.to(queries.dtype))
            nav, nav_norm, crit, crit_norm = torch.ops.vqa_align_glue.ct_helpers_forward(queries, keys, weights)
            saved = (queries, keys, *weights)  # the backward pass recomputes the activations
        else:
            weights = tuple(t.to(dtype) for t in weights)
            nav, nav_norm, crit, crit_norm, activations = _ct_helpers_forward(
                _concat_rows(queries, keys, dtype), weights, glue  # (R, d), R = B·H·(Nq + Nk)
            )
            saved = (*activations, *weights)

        # Transport. S = f(q) f(k)ᵀ lies in [-1, 1], so E = exp(S) needs no max-subtraction; with
        # padded pairs zeroed, the forward plan is E over its row sums and the backward plan E over
        # its column sums. Cost C = 1 - g(q) g(k)ᵀ.
        if blocks:  # per (sample, head), S and C never leave the cache
            row_sum, col_sum, row_cost, col_cost = torch.ops.vqa_align_glue.ct_transport_forward(
                nav, crit, q_valid, k_valid, heads
            )
            e = cost = None
        else:
            nav_q, nav_k = _split_rows(nav, batch, heads, n_queries)  # (B, H, Nq, r), (B, H, Nk, r)
            crit_q, crit_k = _split_rows(crit, batch, heads, n_queries)
            logits = torch.matmul(nav_q, nav_k.transpose(-1, -2))  # S (B, H, Nq, Nk)
            cost_dots = torch.matmul(crit_q, crit_k.transpose(-1, -2))  # g(q)·g(k)
            # E = exp(S) masked, C = 1 - g·g; sums in the accumulation dtype (fp32 at least).
            e, cost, row_sum, col_sum, row_cost, col_cost = glue.transport_forward(logits, cost_dots, q_valid, k_valid)
        acc = row_sum.dtype
        row_sum, col_sum = row_sum.clamp_min_(torch.finfo(acc).tiny), col_sum.clamp_min_(torch.finfo(acc).tiny)
        forward_cost = row_cost / row_sum  # (B, H, Nq): Σ_j π(k_j|q_i) c_ij; row_sum is 0 only at padded rows
        backward_cost = col_cost / col_sum  # (B, H, Nk): Σ_i π(q_i|k_j) c_ij
        q_weight, k_weight = _direction_weights(q_valid, k_valid, rho, 1.0 - rho, acc)  # ρ/n, (1-ρ)/m
        distance = (forward_cost * q_weight).sum(-1) + (backward_cost * k_weight).sum(-1)  # (B, H)

        ctx.save_for_backward(
            nav, nav_norm, crit, crit_norm, e, cost, row_sum, col_sum, forward_cost, backward_cost, q_weight,
            k_weight, q_valid, k_valid, *saved,
        )  # fmt: skip
        return distance

    @staticmethod
    def backward(ctx, grad_distance):  # type: ignore[override]
        _refuse_double_backward("CT")
        (
            nav, nav_norm, crit, crit_norm, e, cost, row_sum, col_sum, forward_cost, backward_cost, q_weight,
            k_weight, q_valid, k_valid, *saved,
        ) = ctx.saved_tensors  # fmt: skip
        glue = glue_for(nav.device)
        n_queries, blocks = ctx.meta.n_queries, ctx.meta.blocks
        batch, heads = row_sum.shape[:2]
        grad_distance = grad_distance.to(row_sum.dtype)[..., None]  # (B, H, 1)

        # With α_i = g·w_i / rowsum_i and β_j = g·w_j / colsum_j (g = dLoss/dD):
        #   dD/dC_ij = E_ij (α_i + β_j)                              (the combined transport plan)
        #   dD/dS_ij = E_ij (α_i (C_ij - fc_i) + β_j (C_ij - bc_j))  (backward of both softmaxes)
        alpha = grad_distance * q_weight / row_sum  # (B, H, Nq)
        beta = grad_distance * k_weight / col_sum  # (B, H, Nk)
        if blocks:
            grad_nav, grad_crit = torch.ops.vqa_align_glue.ct_transport_backward(
                nav, crit, q_valid, k_valid, heads, alpha, beta, alpha * forward_cost, beta * backward_cost
            )  # (R, r) each
        else:
            plan, grad_logits = glue.transport_backward(e, cost, alpha, beta, alpha * forward_cost, beta * backward_cost)
            grad_nav, grad_crit = torch.empty_like(nav), torch.empty_like(crit)  # (R, r) each, the layout of rows
            for grad, factor, unit in ((grad_nav, grad_logits, nav), (grad_crit, plan, crit)):
                unit_q, unit_k = _split_rows(unit, batch, heads, n_queries)
                out_q, out_k = _split_rows(grad, batch, heads, n_queries)
                torch.matmul(factor, unit_k, out=out_q)  # (B, H, Nq, r)
                torch.matmul(factor.transpose(-1, -2), unit_q, out=out_k)  # (B, H, Nk, r)
        if blocks:
            queries, keys, *weights = saved
            grad_q, grad_k, *weight_grads = torch.ops.vqa_align_glue.ct_helpers_backward(
                queries, keys, weights, grad_nav, grad_crit, -1.0, nav, nav_norm, crit, crit_norm
            )  # -1: dC = -d(g·g)
        else:
            activations, weights = saved[:6], saved[6:]
            grad_rows, *weight_grads = _ct_helpers_backward(
                grad_nav, grad_crit, nav, nav_norm, crit, crit_norm, activations, weights, glue
            )
            grad_q, grad_k = _split_rows(grad_rows, batch, heads, n_queries)
        return _FusedConditionalTransport._gradients(ctx, grad_q, grad_k, weight_grads)

    @staticmethod
    def _gradients(ctx, grad_q, grad_k, weight_grads):
        """backward's return value; the critic ascends the cost (its gradients negated)."""
        meta = ctx.meta
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
    critic's parameter gradients negated. ``precision``: see :func:`compute_dtype`.
    """
    return apply_conditional_transport(_FusedConditionalTransport, queries, keys, q_valid, k_valid, navigator, critic,
                                       rho, precision)


def apply_conditional_transport(
    function: type[torch.autograd.Function], queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor,
    navigator: nn.Sequential, critic: nn.Sequential, rho: float, precision: str,
) -> Tensor:  # fmt: skip
    """Run a fused CT autograd ``function`` (this module's, or the Triton one) on ``HeadAligner``'s
    helpers: their parameters in the flat order both take, autocast off (they pick their dtype)."""
    nav_first, nav_second = navigator[0], navigator[2]
    highway, (crit_first, _, crit_second) = critic[0], critic[1]
    dtype = compute_dtype(precision, queries)
    with torch.autocast(queries.device.type, enabled=False):
        return function.apply(
            queries, keys, q_valid, k_valid, rho, dtype, nav_first.weight, nav_first.bias, nav_second.weight,
            nav_second.bias, highway.gates.weight, highway.gates.bias, crit_first.weight, crit_first.bias,
            crit_second.weight, crit_second.bias,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Adversarial (GAN) alignment
# ----------------------------------------------------------------------------------------------


class _FusedAdversarial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, slope, dtype, *weights):  # type: ignore[override]
        # weights: gate_w, gate_b, w1, b1, w2, b2 (highway; Linear-LeakyReLU; Linear to one logit)
        batch, heads, n_queries, d = queries.shape
        widths = (d, weights[2].shape[0])  # d, hidden
        blocks = helper_blocks(queries.device, dtype, widths) and queries.dtype in (torch.float32, torch.bfloat16)
        ctx.meta = (n_queries, slope, queries.dtype, keys.dtype, weights[0].dtype, blocks)
        glue = glue_for(queries.device)
        if blocks:  # every layer per block of rows in the CPU's cache (csrc/aligner_blocks.cpp)
            queries, keys = _row_layout(queries), _row_layout(keys.to(queries.dtype))
            logits = torch.ops.vqa_align_glue.gan_discriminator_forward(queries, keys, weights, slope)  # (R,)
            saved = (queries, keys, *weights)  # the backward pass recomputes the activations
        else:
            rows = _concat_rows(queries, keys, dtype)  # (R, d), R = B·H·(Nq + Nk)
            gate_w, gate_b, w1, b1, w2, b2 = (t.to(dtype) for t in weights)
            highway, transform, gate = glue.highway_forward(rows, gate_w, gate_b)  # (R, d) each
            hidden = glue.linear_activation(highway, w1, b1, slope)  # (R, h); its sign is the pre-activation's
            logits = torch.addmm(b2, hidden, w2.t()).to(accumulation_dtype(dtype)).squeeze(-1)  # (R,)
            saved = (rows, transform, gate, highway, hidden, gate_w, w1, w2)
        logits_q, logits_k = (t.squeeze(-1) for t in _split_rows(logits[:, None], batch, heads, n_queries))  # (B, H, N)

        # BCE(D(k), 1) + BCE(D(q), 0) = softplus(-D(k)) + softplus(D(q)), as masked means.
        q_weight, k_weight = _direction_weights(q_valid, k_valid, 1.0, 1.0, logits.dtype)  # 1/n, 1/m
        loss = (F.softplus(logits_q) * q_weight).sum(-1) + (F.softplus(-logits_k) * k_weight).sum(-1)  # (B, H)
        ctx.save_for_backward(logits, q_weight, k_weight, *saved)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        _refuse_double_backward("GAN")
        logits, q_weight, k_weight, *saved = ctx.saved_tensors
        n_queries, slope, q_dtype, k_dtype, param_dtype, blocks = ctx.meta
        batch, heads = grad_loss.shape
        # d softplus(x)/dx = σ(x); d softplus(-x)/dx = σ(x) - 1.
        upstream = grad_loss.to(logits.dtype)[..., None]  # (B, H, 1)
        probs_q, probs_k = _split_rows(torch.sigmoid(logits)[:, None], batch, heads, n_queries)  # (B, H, N, 1)
        grad_logits = torch.cat([
            (probs_q.squeeze(-1) * q_weight * upstream).flatten(), ((probs_k.squeeze(-1) - 1.0) * k_weight * upstream).flatten()
        ])  # (R,)

        if blocks:
            queries, keys, *weights = saved
            # The projections ascend the discriminator loss: a gradient reversal on q and k (sign -1).
            grad_q, grad_k, *weight_grads = torch.ops.vqa_align_glue.gan_discriminator_backward(
                queries, keys, weights, slope, grad_logits, -1.0
            )
        else:
            rows, transform, gate, highway, hidden, gate_w, w1, w2 = saved
            glue = glue_for(rows.device)
            grad_logits = grad_logits.to(rows.dtype)[:, None]  # (R, 1)
            grad_w2, grad_b2 = grad_logits.t() @ hidden, grad_logits.sum(0)
            grad_hidden_pre, grad_b1 = glue.leaky_relu_backward(grad_logits * w2, hidden, slope)  # (R, h)
            grad_w1 = grad_hidden_pre.t() @ highway
            grad_rows, grad_gate_w, grad_gate_b = _highway_backward(
                glue, grad_hidden_pre @ w1, rows, gate_w, transform, gate, input_sign=-1.0
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


def apply_adversarial(
    function: type[torch.autograd.Function], queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor,
    discriminator: nn.Sequential, precision: str,
) -> Tensor:  # fmt: skip
    """Run a fused GAN autograd ``function`` (this module's, or the Triton one) on ``HeadAligner``'s
    discriminator: its slope and parameters in the order both take, autocast off."""
    highway, (first, activation, second) = discriminator[0], discriminator[1]
    dtype = compute_dtype(precision, queries)
    with torch.autocast(queries.device.type, enabled=False):
        return function.apply(
            queries, keys, q_valid, k_valid, activation.negative_slope, dtype, highway.gates.weight,
            highway.gates.bias, first.weight, first.bias, second.weight, second.bias,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Which implementation runs: the Triton kernels on CUDA (vqa_align.align.kernels.triton)
# ----------------------------------------------------------------------------------------------


@functools.cache
def _import_triton_kernels():
    """vqa_align.align.kernels.triton, imported on first use only (it imports triton) -> (module, None) or
    (None, why not)."""
    try:
        from vqa_align.align.kernels import triton as triton_kernels
    except Exception as err:  # noqa: BLE001 - ImportError, or a Triton that fails to initialise
        return None, f"{type(err).__name__}: {err}"
    return triton_kernels, None


def triton_kernels_for(kernels: str, queries: Tensor, keys: Tensor, transport: bool):
    """:mod:`vqa_align.align.kernels.triton` if CT (``transport``) or GAN runs there, else None (the fused path).

    ``kernels`` is ``AlignmentConfig.kernels``. Triton runs on CUDA only, for fp32/bf16/fp16 inputs
    (an fp64 model asks for fp64 arithmetic, which the kernels do not do) and, for CT, when one
    (sample, head)'s transport fits on-chip (``triton_kernels.MAX_TRANSPORT_POSITIONS``). Only
    shapes and dtypes are read: no host sync, so the choice is the same inside a CUDA graph.
    """
    if kernels not in ("auto", "triton") or queries.device.type != "cuda" or queries.dtype == torch.float64:
        return None
    module, why = _import_triton_kernels()
    if module is None:
        if kernels == "triton":
            raise UserError(
                f"model.alignment.kernels is 'triton' but Triton cannot be used ({why}); install triton or set "
                "model.alignment.kernels to auto or fused"
            )
        warnings.warn(f"Triton cannot be used ({why}): CT/GAN run on the fused PyTorch path", RuntimeWarning, stacklevel=3)
        return None
    if transport and not module.transport_fits(queries, keys):
        return None
    return module
