"""Triton kernels of the GAN aligner on CUDA (shared pieces and the overview: :mod:`.triton_common`).

Forward: one row kernel (the discriminator's logit and the row's BCE term) and one per (sample,
head) for the masked means; backward: one persistent row kernel of the same shape as CT's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from vqa_align.align.kernels.common import apply_adversarial, refuse_double_backward
from vqa_align.align.kernels.triton_common import (
    BLOCK_ROWS_BACKWARD,
    BLOCK_ROWS_FORWARD,
    NUM_WARPS,
    NUM_WARPS_BACKWARD,
    _block,
    _dot_dtype,
    _highway_backward,
    _highway_forward,
    _kernel,
    _load_rows,
    _load_vector,
    _load_weight_t,
    _mask_bytes,
    _mm,
    _mm_acc,
    _persistent_programs,
    _row_offsets,
    _split_weight_grads,
    _store_matrix,
    _store_rows,
    _store_vector,
    _strides,
)

MEAN_BLOCK = 64  # positions per step of the GAN's masked means (a loop: one variant for every shape)


# ----------------------------------------------------------------------------------------------
# GAN
# ----------------------------------------------------------------------------------------------


@triton.jit
def _discriminator(x, gate_w, gate_b, w1, b1, w2, b2, d, hidden, slope, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                   DOT: tl.constexpr):
    """Highway, Linear-LeakyReLU-Linear to one logit of rows x (BR, D) -> logit (BR,), pre-activation
    (BR, H), hidden (BR, H), highway, transform, gate."""
    highway, transform, gate = _highway_forward(x, gate_w, gate_b, d, BLOCK_D, DOT)
    pre = _mm(highway, _load_weight_t(w1, hidden, d, BLOCK_D, BLOCK_H), DOT) + _load_vector(b1, hidden, BLOCK_H)[None, :]
    hidden_act = tl.where(pre > 0.0, pre, slope * pre)
    # One output unit: a row-wise dot product, not a matmul (tl.dot needs >= 16 columns).
    logit = tl.sum(hidden_act * _load_vector(w2, hidden, BLOCK_H)[None, :], axis=1) + tl.load(b2).to(tl.float32)
    return logit, pre, hidden_act, highway, transform, gate


@triton.jit
def _gan_row_weights(q_valid_ptr, k_valid_ptr, inv_count_ptr, is_query, in_range, b, position, n_q, n_k):
    """The row's weight in its masked mean: 1/n (queries) or 1/m (keys) of its sample if the
    position is valid, else 0. inv_count (B, 2) holds 1/n, 1/m (_gan_loss_kernel)."""
    valid_q = tl.load(q_valid_ptr + b * n_q + position, mask=is_query & in_range, other=0) != 0
    valid_k = tl.load(k_valid_ptr + b * n_k + position, mask=(~is_query) & in_range, other=0) != 0
    inv_count = tl.load(inv_count_ptr + 2 * b + tl.where(is_query, 0, 1), mask=in_range, other=0.0)
    return tl.where(valid_q | valid_k, inv_count, 0.0)


@_kernel
def _gan_forward_kernel(
    q_ptr, k_ptr, terms_ptr, gate_w, gate_b, w1, b1, w2, b2,
    n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, d, hidden, slope,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(R, BLOCK_R),): each row's BCE term, softplus(D(q)) = BCE(D(q), 0) for a query,
    softplus(-D(k)) = BCE(D(k), 1) for a key -> terms (R,) fp32 (padding included; _gan_loss_kernel
    averages the valid ones)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    is_query, in_range, offset_q, offset_k, _, _, _ = _row_offsets(
        rows, n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n
    )
    x = _load_rows(q_ptr, k_ptr, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D)
    logit, _, _, _, _, _ = _discriminator(x, gate_w, gate_b, w1, b1, w2, b2, d, hidden, slope, BLOCK_D, BLOCK_H, DOT)
    signed = tl.where(is_query, logit, -logit)
    softplus = tl.maximum(signed, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(signed)))  # stable log(1 + e^x)
    tl.store(terms_ptr + rows, softplus, mask=in_range)


@_kernel
def _gan_loss_kernel(
    terms_ptr, q_valid_ptr, k_valid_ptr, loss_ptr, inv_count_ptr, heads, n_q, n_k, n_query_rows,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (B·H,): L_D of one (sample, head) = mean of the valid queries' terms + mean of the valid
    keys' terms -> loss (B·H,); the programs of head 0 also store 1/n, 1/m of their sample into
    inv_count (B, 2) for the backward pass. Any Nq, Nk (chunks of BLOCK_N)."""
    bh = tl.program_id(0)
    b = bh // heads
    sum_q = tl.zeros((BLOCK_N,), tl.float32)
    count_q = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, n_q, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        ok = tl.load(q_valid_ptr + b * n_q + i, mask=i < n_q, other=0) != 0
        sum_q += tl.load(terms_ptr + bh * n_q + i, mask=ok, other=0.0)
        count_q += ok.to(tl.float32)
    sum_k = tl.zeros((BLOCK_N,), tl.float32)
    count_k = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, n_k, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        ok = tl.load(k_valid_ptr + b * n_k + j, mask=j < n_k, other=0) != 0
        sum_k += tl.load(terms_ptr + n_query_rows + bh * n_k + j, mask=ok, other=0.0)
        count_k += ok.to(tl.float32)
    inv_n = 1.0 / tl.maximum(tl.sum(count_q, axis=0), 1.0)
    inv_m = 1.0 / tl.maximum(tl.sum(count_k, axis=0), 1.0)
    tl.store(loss_ptr + bh, tl.sum(sum_q, axis=0) * inv_n + tl.sum(sum_k, axis=0) * inv_m)
    first_head = bh % heads == 0
    tl.store(inv_count_ptr + 2 * b, inv_n, mask=first_head)
    tl.store(inv_count_ptr + 2 * b + 1, inv_m, mask=first_head)


@_kernel
def _gan_backward_kernel(
    q_ptr, k_ptr, q_valid_ptr, k_valid_ptr, inv_count_ptr, grad_out_ptr, grad_q_ptr, grad_k_ptr, partial_ptr,
    gate_w, gate_b, w1, b1, w2, b2,
    n_query_rows, n_rows, n_blocks, n_weights, heads, n_q, n_k,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    gq_b, gq_h, gq_n, gq_d, gk_b, gk_h, gk_n, gk_d,
    d, hidden, slope, sg_b, sg_h,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Persistent grid (P,): from g = dLoss/dL_D (B, H) (strides sg_b, sg_h) -> the reversed dL_D/dq, dL_D/dk (q and k
    reach D through a gradient reversal: the projections ascend L_D) and this program's weight
    gradients (D descends L_D), flat in the order gate_w, gate_b, w1, b1, w2, b2."""
    pid = tl.program_id(0)
    acc_transform_w = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    acc_transform_b = tl.zeros((BLOCK_D,), tl.float32)
    acc_gate_w = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    acc_gate_b = tl.zeros((BLOCK_D,), tl.float32)
    acc_w1 = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    acc_b1 = tl.zeros((BLOCK_H,), tl.float32)
    acc_w2 = tl.zeros((BLOCK_H,), tl.float32)
    acc_b2 = tl.zeros((BLOCK_R,), tl.float32)  # summed over its rows at the end
    for block in range(pid, n_blocks, tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        is_query, in_range, offset_q, offset_k, b, position, bh = _row_offsets(
            rows, n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n
        )
        x = _load_rows(q_ptr, k_ptr, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D)
        logit, pre, hidden_act, highway, transform, gate = _discriminator(
            x, gate_w, gate_b, w1, b1, w2, b2, d, hidden, slope, BLOCK_D, BLOCK_H, DOT
        )
        # d softplus(x)/dx = σ(x) (queries, target 0); d softplus(-x)/dx = σ(x) - 1 (keys, target 1).
        weight = _gan_row_weights(q_valid_ptr, k_valid_ptr, inv_count_ptr, is_query, in_range, b, position, n_q, n_k)
        upstream = tl.load(grad_out_ptr + b * sg_b + (bh - b * heads) * sg_h, mask=in_range, other=0.0).to(tl.float32)
        grad_logit = upstream * weight * (tl.sigmoid(logit) - tl.where(is_query, 0.0, 1.0))  # (BR,)
        acc_b2 += grad_logit
        acc_w2 += tl.sum(grad_logit[:, None] * hidden_act, axis=0)
        grad_pre = grad_logit[:, None] * _load_vector(w2, hidden, BLOCK_H)[None, :]
        grad_pre = tl.where(pre > 0.0, grad_pre, slope * grad_pre)  # (BR, H)
        acc_b1 += tl.sum(grad_pre, axis=0)
        acc_w1 = _mm_acc(acc_w1, tl.trans(grad_pre), highway, DOT)
        grad_highway = _mm(grad_pre, tl.trans(_load_weight_t(w1, hidden, d, BLOCK_D, BLOCK_H)), DOT)  # (BR, D)
        grad_x, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b = _highway_backward(
            grad_highway, x, transform, gate, gate_w, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b,
            d, BLOCK_D, DOT
        )  # (BR, D)
        _, _, out_q, out_k, _, _, _ = _row_offsets(
            rows, n_query_rows, n_rows, heads, n_q, n_k, gq_b, gq_h, gq_n, gk_b, gk_h, gk_n
        )  # the reversal: the projections get -dL_D/dx
        _store_rows(grad_q_ptr, grad_k_ptr, -grad_x, is_query, in_range, out_q, out_k, d, gq_d, gk_d, BLOCK_D)

    out = partial_ptr + pid * n_weights
    _store_matrix(out, acc_transform_w, d, d, BLOCK_D, BLOCK_D)
    _store_matrix(out + d * d, acc_gate_w, d, d, BLOCK_D, BLOCK_D)
    out += 2 * d * d
    _store_vector(out, acc_transform_b, d, BLOCK_D)
    _store_vector(out + d, acc_gate_b, d, BLOCK_D)
    out += 2 * d
    _store_matrix(out, acc_w1, hidden, d, BLOCK_H, BLOCK_D)
    out += hidden * d
    _store_vector(out, acc_b1, hidden, BLOCK_H)
    out += hidden
    _store_vector(out, acc_w2, hidden, BLOCK_H)
    out += hidden
    tl.store(out, tl.sum(acc_b2, axis=0))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


class TritonAdversarial(torch.autograd.Function):
    """GAN loss of :class:`~vqa_align.align.aligner.HeadAligner`: same arguments and results as
    ``vqa_align.align.kernels.fused._FusedAdversarial`` (weights: gate_w, gate_b, w1, b1, w2, b2) -> (B, H) fp32."""

    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, slope, dtype, *weights):  # type: ignore[override]
        batch, heads, n_q, d = queries.shape
        n_k = keys.shape[-2]
        weights = tuple(w.contiguous() for w in weights)
        hidden = weights[2].shape[0]
        q_valid, k_valid = _mask_bytes(q_valid), _mask_bytes(k_valid)
        n_query_rows = batch * heads * n_q
        n_rows = n_query_rows + batch * heads * n_k
        terms = torch.empty(n_rows, device=queries.device, dtype=torch.float32)
        dot = _dot_dtype(dtype)
        _gan_forward_kernel[(triton.cdiv(n_rows, BLOCK_ROWS_FORWARD),)](
            queries, keys, terms, *weights, n_query_rows, n_rows, heads, n_q, n_k,
            *_strides(queries), *_strides(keys), d, hidden, float(slope),
            BLOCK_R=BLOCK_ROWS_FORWARD, BLOCK_D=_block(d), BLOCK_H=_block(hidden), DOT=dot, num_warps=NUM_WARPS,
        )  # fmt: skip
        loss = torch.empty(batch, heads, device=queries.device, dtype=torch.float32)
        inv_count = torch.empty(batch, 2, device=queries.device, dtype=torch.float32)  # 1/n, 1/m per sample
        _gan_loss_kernel[(batch * heads,)](
            terms, q_valid, k_valid, loss, inv_count, heads, n_q, n_k, n_query_rows,
            BLOCK_N=MEAN_BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
        ctx.slope, ctx.dot = float(slope), dot
        ctx.save_for_backward(queries, keys, q_valid, k_valid, inv_count, *weights)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        refuse_double_backward("GAN")
        queries, keys, q_valid, k_valid, inv_count, *weights = ctx.saved_tensors
        weights = tuple(weights)
        batch, heads, n_q, d = queries.shape
        n_k = keys.shape[-2]
        hidden = weights[2].shape[0]
        n_query_rows = batch * heads * n_q
        n_rows = n_query_rows + batch * heads * n_k
        grad_q = torch.empty(queries.shape, device=queries.device, dtype=queries.dtype)
        grad_k = torch.empty(keys.shape, device=keys.device, dtype=keys.dtype)
        n_blocks = triton.cdiv(n_rows, BLOCK_ROWS_BACKWARD)
        programs = _persistent_programs(n_blocks, queries.device)
        n_weights = sum(w.numel() for w in weights)
        partials = torch.empty(programs, n_weights, device=queries.device, dtype=torch.float32)
        _gan_backward_kernel[(programs,)](
            queries, keys, q_valid, k_valid, inv_count, grad_loss, grad_q, grad_k, partials, *weights,
            n_query_rows, n_rows, n_blocks, n_weights, heads, n_q, n_k,
            *_strides(queries), *_strides(keys), *_strides(grad_q), *_strides(grad_k), d, hidden, ctx.slope,
            *grad_loss.stride(),
            BLOCK_R=BLOCK_ROWS_BACKWARD, BLOCK_D=_block(d), BLOCK_H=_block(hidden), DOT=ctx.dot,
            num_warps=NUM_WARPS_BACKWARD,
        )  # fmt: skip
        weight_grads = _split_weight_grads(partials, weights)
        return (grad_q, grad_k, None, None, None, None, *(g.to(w.dtype) for g, w in zip(weight_grads, weights, strict=True)))


def triton_adversarial_loss(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, discriminator: nn.Sequential, precision: str = "fp32"
) -> Tensor:
    """``vqa_align.align.kernels.fused.fused_adversarial_loss`` in Triton -> (B, H) fp32."""
    return apply_adversarial(TritonAdversarial, queries, keys, q_valid, k_valid, discriminator, precision)
