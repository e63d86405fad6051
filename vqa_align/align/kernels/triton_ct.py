"""Triton kernels of the CT aligner on CUDA (shared pieces and the overview: :mod:`.triton_common`).

CT, forward (2 launches): ``_ct_helpers_forward_kernel`` (navigator and critic of each row ->
nav, crit (R, r) fp32), then ``_ct_transport_forward_kernel`` per (sample, head) (S, E, C on-chip,
the distance). Backward: the helpers' forward again, ``_ct_transport_backward_kernel``, then the
persistent ``_ct_helpers_backward_kernel`` once for the navigator and once for the critic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from vqa_align.align.kernels.common import apply_conditional_transport, refuse_double_backward
from vqa_align.align.kernels.triton_common import (
    _TINY,
    BLOCK_ROWS_BACKWARD,
    BLOCK_ROWS_FORWARD,
    NUM_WARPS,
    NUM_WARPS_BACKWARD,
    _block,
    _dot_dtype,
    _head_backward,
    _highway_backward,
    _highway_forward,
    _kernel,
    _load_rows,
    _load_vector,
    _load_weight_t,
    _mask_bytes,
    _mm,
    _normalize,
    _persistent_programs,
    _row_offsets,
    _split_weight_grads,
    _store_matrix,
    _store_rows,
    _store_vector,
    _strides,
)

# One (sample, head)'s transport matrices are single on-chip tiles: MCAN has <= 100 regions and
# 14 tokens. Longer sequences take the fused PyTorch path (see :func:`transport_fits`).
MAX_TRANSPORT_POSITIONS = 128
SMALL_TRANSPORT_TILE = 128 * 16  # up to this many (query, key) pairs: 4 warps; above: 8
TRANSPORT_BLOCKS = (16, 32, 64, 128)  # every tile side _block() gives for 1..MAX_TRANSPORT_POSITIONS


def transport_warps(n_q: int, n_k: int) -> int:
    return NUM_WARPS if _block(n_q) * _block(n_k) <= SMALL_TRANSPORT_TILE else 2 * NUM_WARPS


def transport_fits(queries: Tensor, keys: Tensor) -> bool:
    """Whether CT's per-(sample, head) transport tile fits on-chip (both position counts <= 128)."""
    return max(queries.shape[-2], keys.shape[-2]) <= MAX_TRANSPORT_POSITIONS


# ----------------------------------------------------------------------------------------------
# Conditional transport
# ----------------------------------------------------------------------------------------------


@triton.jit
def _navigator(
    x, nav_w1, nav_b1, nav_w2, nav_b2, d, hidden_nav, r,
    BLOCK_D: tl.constexpr, BLOCK_HN: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Navigator Linear-ReLU-Linear, normalised, of rows x (BLOCK_R, BLOCK_D) -> nav, nav_norm, hidden."""
    hidden = _mm(x, _load_weight_t(nav_w1, hidden_nav, d, BLOCK_D, BLOCK_HN), DOT)
    hidden = tl.maximum(hidden + _load_vector(nav_b1, hidden_nav, BLOCK_HN)[None, :], 0.0)  # (BR, HN)
    raw = _mm(hidden, _load_weight_t(nav_w2, r, hidden_nav, BLOCK_HN, BLOCK_OUT), DOT)
    nav, norm = _normalize(raw + _load_vector(nav_b2, r, BLOCK_OUT)[None, :])  # (BR, R), (BR,)
    return nav, norm, hidden


@triton.jit
def _critic(
    x, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2, d, hidden_crit, r,
    BLOCK_D: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Critic Highway, Linear-ReLU-Linear, normalised, of rows x -> crit, crit_norm, hidden,
    highway, transform, gate."""
    highway, transform, gate = _highway_forward(x, gate_w, gate_b, d, BLOCK_D, DOT)  # (BR, D) each
    hidden = _mm(highway, _load_weight_t(crit_w1, hidden_crit, d, BLOCK_D, BLOCK_HC), DOT)
    hidden = tl.maximum(hidden + _load_vector(crit_b1, hidden_crit, BLOCK_HC)[None, :], 0.0)  # (BR, HC)
    raw = _mm(hidden, _load_weight_t(crit_w2, r, hidden_crit, BLOCK_HC, BLOCK_OUT), DOT)
    crit, norm = _normalize(raw + _load_vector(crit_b2, r, BLOCK_OUT)[None, :])  # (BR, R), (BR,)
    return crit, norm, hidden, highway, transform, gate


@_kernel
def _ct_helpers_forward_kernel(
    q_ptr, k_ptr, nav_ptr, crit_ptr,
    nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2,
    n_query_rows, n_rows, heads, n_q, n_k,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    d, hidden_nav, hidden_crit, r,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HN: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_OUT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(R, BLOCK_R),): nav, crit (R, r) fp32 of the program's rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    is_query, in_range, offset_q, offset_k, _, _, _ = _row_offsets(
        rows, n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n
    )
    x = _load_rows(q_ptr, k_ptr, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D)  # (BR, D)
    nav, _, _ = _navigator(x, nav_w1, nav_b1, nav_w2, nav_b2, d, hidden_nav, r, BLOCK_D, BLOCK_HN, BLOCK_OUT, DOT)
    crit, _, _, _, _, _ = _critic(
        x, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2, d, hidden_crit, r, BLOCK_D, BLOCK_HC, BLOCK_OUT, DOT
    )
    cols = tl.arange(0, BLOCK_OUT)
    mask = in_range[:, None] & (cols < r)[None, :]
    tl.store(nav_ptr + rows[:, None] * r + cols[None, :], nav, mask=mask)
    tl.store(crit_ptr + rows[:, None] * r + cols[None, :], crit, mask=mask)


@triton.jit
def _ct_load_pair(
    nav_ptr, crit_ptr, q_valid_ptr, k_valid_ptr, bh, heads, n_q, n_k, n_query_rows, r,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
):  # fmt: skip
    """One (sample, head)'s nav/crit rows and masks -> nav_q, crit_q (BQ, R), nav_k, crit_k (BK, R),
    q_ok (BQ,), k_ok (BK,), their row indices."""
    b = bh // heads
    i = tl.arange(0, BLOCK_Q)
    j = tl.arange(0, BLOCK_K)
    c = tl.arange(0, BLOCK_OUT)
    q_rows = bh * n_q + i
    k_rows = n_query_rows + bh * n_k + j
    q_mask = (i < n_q)[:, None] & (c < r)[None, :]
    k_mask = (j < n_k)[:, None] & (c < r)[None, :]
    nav_q = tl.load(nav_ptr + q_rows[:, None] * r + c[None, :], mask=q_mask, other=0.0)
    crit_q = tl.load(crit_ptr + q_rows[:, None] * r + c[None, :], mask=q_mask, other=0.0)
    nav_k = tl.load(nav_ptr + k_rows[:, None] * r + c[None, :], mask=k_mask, other=0.0)
    crit_k = tl.load(crit_ptr + k_rows[:, None] * r + c[None, :], mask=k_mask, other=0.0)
    q_ok = tl.load(q_valid_ptr + b * n_q + i, mask=i < n_q, other=0) != 0
    k_ok = tl.load(k_valid_ptr + b * n_k + j, mask=j < n_k, other=0) != 0
    return nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, q_rows, k_rows


@triton.jit
def _ct_transport(nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, DOT: tl.constexpr):
    """E = exp(S) on valid pairs (S = nav_q nav_kᵀ in [-1, 1]), C = 1 - crit_q crit_kᵀ, and the
    row / column sums and mean costs of both plans: fc_i = Σ_j π(k_j|q_i) C_ij, bc_j = Σ_i π(q_i|k_j) C_ij."""
    logits = _mm(nav_q, tl.trans(nav_k), DOT)  # S (BQ, BK)
    pair = q_ok[:, None] & k_ok[None, :]
    e = tl.where(pair, tl.exp(logits), 0.0)
    cost = 1.0 - _mm(crit_q, tl.trans(crit_k), DOT)  # C (BQ, BK)
    row_sum = tl.maximum(tl.sum(e, axis=1), _TINY)  # 0 only at padded rows
    col_sum = tl.maximum(tl.sum(e, axis=0), _TINY)
    forward_cost = tl.sum(e * cost, axis=1) / row_sum  # (BQ,)
    backward_cost = tl.sum(e * cost, axis=0) / col_sum  # (BK,)
    return e, cost, row_sum, col_sum, forward_cost, backward_cost


@triton.jit
def _ct_direction_weights(q_ok, k_ok, rho):
    """ρ/n on valid queries, (1-ρ)/m on valid keys (0 on padding)."""
    n = tl.maximum(tl.sum(q_ok.to(tl.float32), axis=0), 1.0)
    m = tl.maximum(tl.sum(k_ok.to(tl.float32), axis=0), 1.0)
    return tl.where(q_ok, rho / n, 0.0), tl.where(k_ok, (1.0 - rho) / m, 0.0)


@_kernel
def _ct_transport_forward_kernel(
    nav_ptr, crit_ptr, q_valid_ptr, k_valid_ptr, out_ptr, heads, n_q, n_k, n_query_rows, r, rho,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid (B·H,): the CT distance of one (sample, head) -> out (B·H,) fp32."""
    bh = tl.program_id(0)
    nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, _, _ = _ct_load_pair(
        nav_ptr, crit_ptr, q_valid_ptr, k_valid_ptr, bh, heads, n_q, n_k, n_query_rows, r, BLOCK_Q, BLOCK_K, BLOCK_OUT
    )
    _, _, _, _, forward_cost, backward_cost = _ct_transport(nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, DOT)
    q_weight, k_weight = _ct_direction_weights(q_ok, k_ok, rho)
    tl.store(out_ptr + bh, tl.sum(forward_cost * q_weight, axis=0) + tl.sum(backward_cost * k_weight, axis=0))


@_kernel
def _ct_transport_backward_kernel(
    nav_ptr, crit_ptr, q_valid_ptr, k_valid_ptr, grad_out_ptr, grad_nav_ptr, grad_crit_ptr,
    heads, n_q, n_k, n_query_rows, r, rho, sg_b, sg_h,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Grid (B·H,): dD/dnav, dD/dcrit (R, r) of one (sample, head)'s rows, from g = dLoss/dD (B, H)
    (strides sg_b, sg_h: an expanded gradient, e.g. of a mean, is read as it is).

    With α_i = g·w_i / rowsum_i and β_j = g·w'_j / colsum_j:
      dD/dC_ij = E_ij (α_i + β_j)                               (both plans, weighted)
      dD/dS_ij = E_ij (α_i (C_ij - fc_i) + β_j (C_ij - bc_j))   (backward of both softmaxes)
    and C = 1 - crit_q crit_kᵀ, S = nav_q nav_kᵀ.
    """
    bh = tl.program_id(0)
    nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, q_rows, k_rows = _ct_load_pair(
        nav_ptr, crit_ptr, q_valid_ptr, k_valid_ptr, bh, heads, n_q, n_k, n_query_rows, r, BLOCK_Q, BLOCK_K, BLOCK_OUT
    )
    e, cost, row_sum, col_sum, forward_cost, backward_cost = _ct_transport(nav_q, crit_q, nav_k, crit_k, q_ok, k_ok, DOT)
    q_weight, k_weight = _ct_direction_weights(q_ok, k_ok, rho)
    upstream = tl.load(grad_out_ptr + (bh // heads) * sg_b + (bh % heads) * sg_h).to(tl.float32)
    alpha = upstream * q_weight / row_sum  # (BQ,)
    beta = upstream * k_weight / col_sum  # (BK,)
    grad_cost = e * (alpha[:, None] + beta[None, :])  # (BQ, BK)
    grad_logits = e * (alpha[:, None] * (cost - forward_cost[:, None]) + beta[None, :] * (cost - backward_cost[None, :]))
    c = tl.arange(0, BLOCK_OUT)
    q_mask = (tl.arange(0, BLOCK_Q) < n_q)[:, None] & (c < r)[None, :]
    k_mask = (tl.arange(0, BLOCK_K) < n_k)[:, None] & (c < r)[None, :]
    tl.store(grad_nav_ptr + q_rows[:, None] * r + c[None, :], _mm(grad_logits, nav_k, DOT), mask=q_mask)
    tl.store(grad_nav_ptr + k_rows[:, None] * r + c[None, :], _mm(tl.trans(grad_logits), nav_q, DOT), mask=k_mask)
    tl.store(grad_crit_ptr + q_rows[:, None] * r + c[None, :], -_mm(grad_cost, crit_k, DOT), mask=q_mask)  # dC = -d(g·g)
    tl.store(grad_crit_ptr + k_rows[:, None] * r + c[None, :], -_mm(tl.trans(grad_cost), crit_q, DOT), mask=k_mask)


@triton.jit
def _store_ct_weight_grads(
    out, acc_w1, acc_b1, acc_w2, acc_b2, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b,
    d, hidden_nav, hidden_crit, r,
    BLOCK_D: tl.constexpr, BLOCK_HN: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_OUT: tl.constexpr,
    CRITIC: tl.constexpr,
):  # fmt: skip
    """The weight-gradient sums of one program of _ct_helpers_backward_kernel, flat, into its row
    ``out`` of the partial sums (each launch fills its own network's entries)."""
    # Flat order: nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2
    # (the gates' weight and bias: transform rows, then gate rows).
    if CRITIC:
        # The critic ascends the cost (ALIGNMENT.md): its parameter gradients are stored negated.
        out += hidden_nav * d + hidden_nav + r * hidden_nav + r
        _store_matrix(out, -acc_transform_w, d, d, BLOCK_D, BLOCK_D)
        _store_matrix(out + d * d, -acc_gate_w, d, d, BLOCK_D, BLOCK_D)
        out += 2 * d * d
        _store_vector(out, -acc_transform_b, d, BLOCK_D)
        _store_vector(out + d, -acc_gate_b, d, BLOCK_D)
        out += 2 * d
        _store_matrix(out, -acc_w1, hidden_crit, d, BLOCK_HC, BLOCK_D)
        out += hidden_crit * d
        _store_vector(out, -acc_b1, hidden_crit, BLOCK_HC)
        out += hidden_crit
        _store_matrix(out, -acc_w2, r, hidden_crit, BLOCK_OUT, BLOCK_HC)
        out += r * hidden_crit
        _store_vector(out, -acc_b2, r, BLOCK_OUT)
    else:
        _store_matrix(out, acc_w1, hidden_nav, d, BLOCK_HN, BLOCK_D)
        out += hidden_nav * d
        _store_vector(out, acc_b1, hidden_nav, BLOCK_HN)
        out += hidden_nav
        _store_matrix(out, acc_w2, r, hidden_nav, BLOCK_OUT, BLOCK_HN)
        out += r * hidden_nav
        _store_vector(out, acc_b2, r, BLOCK_OUT)


@_kernel
def _ct_helpers_backward_kernel(
    q_ptr, k_ptr, grad_nav_ptr, grad_crit_ptr, grad_q_ptr, grad_k_ptr, partial_ptr,
    nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2,
    n_query_rows, n_rows, n_blocks, n_weights, heads, n_q, n_k,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
    gq_b, gq_h, gq_n, gq_d, gk_b, gk_h, gk_n, gk_d,
    d, hidden_nav, hidden_crit, r,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HN: tl.constexpr, BLOCK_HC: tl.constexpr,
    BLOCK_OUT: tl.constexpr, DOT: tl.constexpr, CRITIC: tl.constexpr,
):  # fmt: skip
    """Persistent grid (P,): every P-th block of BLOCK_R rows. One helper network per launch, so
    that only its weight gradients are held on-chip: CRITIC False, the navigator, from dD/dnav
    (R, r), stores its part of dD/dq, dD/dk; CRITIC True, the critic, from dD/dcrit, adds its part.
    The weight-gradient sums of the program's rows go flat, in the order of the ten weights, into
    partial_ptr[pid] (n_weights fp32; each launch fills its own network's entries; the critic's
    negated)."""
    pid = tl.program_id(0)
    # Accumulators of both networks are declared (the compiler drops the unused ones).
    acc_w1 = tl.zeros((BLOCK_HC if CRITIC else BLOCK_HN, BLOCK_D), tl.float32)  # first Linear
    acc_b1 = tl.zeros((BLOCK_HC if CRITIC else BLOCK_HN,), tl.float32)
    acc_w2 = tl.zeros((BLOCK_OUT, BLOCK_HC if CRITIC else BLOCK_HN), tl.float32)  # second Linear
    acc_b2 = tl.zeros((BLOCK_OUT,), tl.float32)
    acc_transform_w = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)  # the critic's highway
    acc_transform_b = tl.zeros((BLOCK_D,), tl.float32)
    acc_gate_w = tl.zeros((BLOCK_D, BLOCK_D), tl.float32)
    acc_gate_b = tl.zeros((BLOCK_D,), tl.float32)
    cols_out = tl.arange(0, BLOCK_OUT)
    for block in range(pid, n_blocks, tl.num_programs(0)):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        is_query, in_range, offset_q, offset_k, _, _, _ = _row_offsets(
            rows, n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n
        )
        _, _, out_q, out_k, _, _, _ = _row_offsets(
            rows, n_query_rows, n_rows, heads, n_q, n_k, gq_b, gq_h, gq_n, gk_b, gk_h, gk_n
        )
        x = _load_rows(q_ptr, k_ptr, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D)  # (BR, D)
        out_mask = in_range[:, None] & (cols_out < r)[None, :]
        if CRITIC:
            # Normalise, Linear, ReLU, Linear, highway.
            crit, crit_norm, hidden, highway, transform, gate = _critic(
                x, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2, d, hidden_crit, r, BLOCK_D, BLOCK_HC, BLOCK_OUT, DOT
            )
            grad_crit = tl.load(grad_crit_ptr + rows[:, None] * r + cols_out[None, :], mask=out_mask, other=0.0)
            grad_highway, acc_b1, acc_w1, acc_b2, acc_w2 = _head_backward(
                grad_crit, crit, crit_norm, hidden, highway, crit_w1, crit_w2, acc_b1, acc_w1, acc_b2, acc_w2, d,
                hidden_crit, r, BLOCK_D, BLOCK_HC, BLOCK_OUT, DOT
            )
            grad_x, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b = _highway_backward(
                grad_highway, x, transform, gate, gate_w, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b,
                d, BLOCK_D, DOT
            )  # (BR, D)
            # + the navigator's part, stored by the first launch.
            grad_x += _load_rows(grad_q_ptr, grad_k_ptr, is_query, in_range, out_q, out_k, d, gq_d, gk_d, BLOCK_D)
        else:
            # Normalise, Linear, ReLU, Linear.
            nav, nav_norm, hidden = _navigator(
                x, nav_w1, nav_b1, nav_w2, nav_b2, d, hidden_nav, r, BLOCK_D, BLOCK_HN, BLOCK_OUT, DOT
            )
            grad_nav = tl.load(grad_nav_ptr + rows[:, None] * r + cols_out[None, :], mask=out_mask, other=0.0)
            grad_x, acc_b1, acc_w1, acc_b2, acc_w2 = _head_backward(
                grad_nav, nav, nav_norm, hidden, x, nav_w1, nav_w2, acc_b1, acc_w1, acc_b2, acc_w2, d, hidden_nav, r,
                BLOCK_D, BLOCK_HN, BLOCK_OUT, DOT
            )
        _store_rows(grad_q_ptr, grad_k_ptr, grad_x, is_query, in_range, out_q, out_k, d, gq_d, gk_d, BLOCK_D)

    _store_ct_weight_grads(
        partial_ptr + pid * n_weights, acc_w1, acc_b1, acc_w2, acc_b2, acc_transform_w, acc_transform_b, acc_gate_w,
        acc_gate_b, d, hidden_nav, hidden_crit, r, BLOCK_D, BLOCK_HN, BLOCK_HC, BLOCK_OUT, CRITIC,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _ct_helper_rows(queries: Tensor, keys: Tensor, weights: tuple[Tensor, ...], dot) -> tuple[Tensor, Tensor]:
    """Launch _ct_helpers_forward_kernel -> nav, crit (R, r) fp32."""
    batch, heads, n_q, d = queries.shape
    n_k = keys.shape[-2]
    hidden_nav, hidden_crit, r = weights[0].shape[0], weights[6].shape[0], weights[2].shape[0]
    n_query_rows = batch * heads * n_q
    n_rows = n_query_rows + batch * heads * n_k
    nav = torch.empty(n_rows, r, device=queries.device, dtype=torch.float32)
    crit = torch.empty_like(nav)
    grid = (triton.cdiv(n_rows, BLOCK_ROWS_FORWARD),)
    _ct_helpers_forward_kernel[grid](
        queries, keys, nav, crit, *weights, n_query_rows, n_rows, heads, n_q, n_k,
        *_strides(queries), *_strides(keys), d, hidden_nav, hidden_crit, r,
        BLOCK_R=BLOCK_ROWS_FORWARD, BLOCK_D=_block(d), BLOCK_HN=_block(hidden_nav), BLOCK_HC=_block(hidden_crit),
        BLOCK_OUT=_block(r), DOT=dot, num_warps=NUM_WARPS,
    )  # fmt: skip
    return nav, crit


def _transport_forward(nav, crit, q_valid, k_valid, out, batch, heads, n_q, n_k, rho, dot) -> None:
    """Launch _ct_transport_forward_kernel: one program per (sample, head) -> out (B, H)."""
    r = nav.shape[1]
    _ct_transport_forward_kernel[(batch * heads,)](
        nav, crit, q_valid, k_valid, out, heads, n_q, n_k, batch * heads * n_q, r, rho,
        BLOCK_Q=_block(n_q), BLOCK_K=_block(n_k), BLOCK_OUT=_block(r), DOT=dot, num_warps=transport_warps(n_q, n_k),
    )  # fmt: skip


def _transport_backward(nav, crit, q_valid, k_valid, grad_out, grad_nav, grad_crit, batch, heads, n_q, n_k, rho, dot):
    """Launch _ct_transport_backward_kernel: dD/dnav, dD/dcrit from dLoss/dD (B, H), any strides."""
    r = nav.shape[1]
    _ct_transport_backward_kernel[(batch * heads,)](
        nav, crit, q_valid, k_valid, grad_out, grad_nav, grad_crit, heads, n_q, n_k, batch * heads * n_q, r, rho,
        *grad_out.stride(), BLOCK_Q=_block(n_q), BLOCK_K=_block(n_k), BLOCK_OUT=_block(r), DOT=dot,
        num_warps=transport_warps(n_q, n_k),
    )  # fmt: skip


_prepared_transport: set[tuple] = set()


def prepare_transport_variants(device: torch.device, r: int, dot) -> None:
    """Launch both transport kernels once on dummy data for every tile (TRANSPORT_BLOCKS²), so that
    all their binaries are loaded before a CUDA graph is captured ("CUDA graphs" above). Once per
    process, device, width and dtype; CUDA only (the interpreter loads nothing)."""
    key = (device, r, str(dot))
    if device.type != "cuda" or key in _prepared_transport:
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the Triton CT kernels were first called inside a CUDA-graph capture; run one step eagerly first "
            "(train.cuda_graphs does), or set model.alignment.kernels: fused"
        )
    for n_q in TRANSPORT_BLOCKS:
        for n_k in TRANSPORT_BLOCKS:
            nav = torch.zeros(n_q + n_k, r, device=device)
            crit = torch.zeros_like(nav)
            q_valid = torch.ones(1, n_q, device=device, dtype=torch.uint8)
            k_valid = torch.ones(1, n_k, device=device, dtype=torch.uint8)
            out = torch.zeros(1, 1, device=device)
            _transport_forward(nav, crit, q_valid, k_valid, out, 1, 1, n_q, n_k, 0.5, dot)
            _transport_backward(nav, crit, q_valid, k_valid, out, nav, crit, 1, 1, n_q, n_k, 0.5, dot)
    _prepared_transport.add(key)


class TritonConditionalTransport(torch.autograd.Function):
    """CT of :class:`~vqa_align.align.aligner.HeadAligner`: same arguments and results as
    ``vqa_align.align.kernels.fused._FusedConditionalTransport`` (weights: nav_w1, nav_b1, nav_w2, nav_b2,
    gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2) -> (B, H) fp32."""

    @staticmethod
    def forward(ctx, queries, keys, q_valid, k_valid, rho, dtype, *weights):  # type: ignore[override]
        batch, heads, n_q, _ = queries.shape
        n_k = keys.shape[-2]
        weights = tuple(w.contiguous() for w in weights)
        q_valid, k_valid = _mask_bytes(q_valid), _mask_bytes(k_valid)
        dot = _dot_dtype(dtype)
        nav, crit = _ct_helper_rows(queries, keys, weights, dot)  # (R, r) each
        prepare_transport_variants(queries.device, nav.shape[1], dot)
        distance = torch.empty(batch, heads, device=queries.device, dtype=torch.float32)
        _transport_forward(nav, crit, q_valid, k_valid, distance, batch, heads, n_q, n_k, float(rho), dot)
        ctx.rho, ctx.dot = float(rho), dot
        ctx.save_for_backward(queries, keys, q_valid, k_valid, *weights)  # activations are recomputed
        return distance

    @staticmethod
    def backward(ctx, grad_distance):  # type: ignore[override]
        refuse_double_backward("CT")
        queries, keys, q_valid, k_valid, *weights = ctx.saved_tensors
        weights = tuple(weights)
        batch, heads, n_q, d = queries.shape
        n_k = keys.shape[-2]
        hidden_nav, hidden_crit, r = weights[0].shape[0], weights[6].shape[0], weights[2].shape[0]
        n_query_rows = batch * heads * n_q
        n_rows = n_query_rows + batch * heads * n_k
        dot = ctx.dot

        nav, crit = _ct_helper_rows(queries, keys, weights, dot)  # recomputed (R, r)
        # In place: each program reads its (sample, head)'s rows of nav and crit before it writes
        # their gradients there, and no other program touches those rows.
        grad_nav, grad_crit = nav, crit
        _transport_backward(
            nav, crit, q_valid, k_valid, grad_distance, grad_nav, grad_crit, batch, heads, n_q, n_k, ctx.rho, dot
        )
        del nav, crit  # now dD/dnav, dD/dcrit

        grad_q = torch.empty(queries.shape, device=queries.device, dtype=queries.dtype)
        grad_k = torch.empty(keys.shape, device=keys.device, dtype=keys.dtype)
        n_blocks = triton.cdiv(n_rows, BLOCK_ROWS_BACKWARD)
        programs = _persistent_programs(n_blocks, queries.device)
        n_weights = sum(w.numel() for w in weights)
        partials = torch.empty(programs, n_weights, device=queries.device, dtype=torch.float32)
        for critic in (False, True):  # the navigator's part of dD/dq, dD/dk, then the critic's added
            _ct_helpers_backward_kernel[(programs,)](
                queries, keys, grad_nav, grad_crit, grad_q, grad_k, partials, *weights,
                n_query_rows, n_rows, n_blocks, n_weights, heads, n_q, n_k,
                *_strides(queries), *_strides(keys), *_strides(grad_q), *_strides(grad_k),
                d, hidden_nav, hidden_crit, r,
                BLOCK_R=BLOCK_ROWS_BACKWARD, BLOCK_D=_block(d), BLOCK_HN=_block(hidden_nav),
                BLOCK_HC=_block(hidden_crit), BLOCK_OUT=_block(r), DOT=dot, CRITIC=critic, num_warps=NUM_WARPS_BACKWARD,
            )  # fmt: skip
        weight_grads = _split_weight_grads(partials, weights)  # the critic's already negated
        return (grad_q, grad_k, None, None, None, None, *(g.to(w.dtype) for g, w in zip(weight_grads, weights, strict=True)))


def triton_conditional_transport(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, navigator: nn.Sequential, critic: nn.Sequential,
    rho: float, precision: str = "fp32",
) -> Tensor:  # fmt: skip
    """``vqa_align.align.kernels.fused.fused_conditional_transport`` in Triton -> (B, H) fp32 (Nq, Nk <= 128)."""
    return apply_conditional_transport(TritonConditionalTransport, queries, keys, q_valid, k_valid, navigator, critic,
                                       rho, precision)
