"""Triton kernels for the CT and GAN aligners on CUDA (issue 19: few launches, nothing big in HBM).

The plain modules of :mod:`vqa_align.align.aligner` are the reference; these autograd functions take
the same inputs as the hand-fused ones of :mod:`vqa_align.align.kernels.fused` and compute the same
values and gradients (tests/test_triton_kernels.py runs them in Triton's CPU interpreter). Why:
on a GPU the fused PyTorch path is dozens of small launches per aligned module, and it stores
every helper activation (R, width) and the (B, H, Nq, Nk) plan and cost matrices for backward.

Rows. A helper network maps one 64-d row to a few numbers; the rows are every query of every
(sample, head) and then every key: R = B·H·Nq + B·H·Nk. Kernels read q (B, H, Nq, d) and
k (B, H, Nk, d) through their strides (the attention's transposed views are not copied).

CT, forward (2 launches):
  1. ``_ct_helpers_forward_kernel``, one program per BLOCK_R rows: navigator and critic of each
     row, normalised -> nav, crit (R, r) fp32 (the only per-row tensors that reach HBM).
  2. ``_ct_transport_forward_kernel``, one program per (sample, head): S = nav_q nav_kᵀ,
     E = exp(S) on valid pairs (|S| <= 1: no max-subtraction), C = 1 - crit_q crit_kᵀ, both plans
     as E over its row / column sums, the distance. S, E, C stay on-chip (Nq, Nk <= 128).
  Saved for backward: q, k (the attention keeps them anyway), the masks and the weights.
CT, backward (4 launches + one sum):
  1. the helpers' forward again (recompute instead of storing activations);
  2. ``_ct_transport_backward_kernel`` per (sample, head): dD/dnav, dD/dcrit (R, r), written over
     nav and crit;
  3. ``_ct_helpers_backward_kernel``, persistent (a few programs per SM, each looping over row
     blocks), once for the navigator and once for the critic (so that only one network's weight
     gradients are held on-chip): recomputes the network's activations per row, backpropagates
     through normalisation, MLP (and highway), writes (navigator) or adds (critic) dD/dq, dD/dk,
     and accumulates the weight gradients of its rows on-chip; the per-program partial sums
     (P, n_weights) are added by one torch sum (deterministic, no atomics).
GAN: forward, one row kernel (discriminator logit and the row's BCE term) and one per (sample,
head) for the masked means; backward, one persistent row kernel of the same shape as CT's.

Numerics: matmul operands in the compute dtype (bf16 under ``helper_precision`` auto/bf16 on CUDA;
fp32 operands as "tf32x3", about fp32's accuracy on the tensor cores), accumulation and all
elementwise work in fp32; the distance is fp32. No host sync in any launch path (grids come from
shapes, the SM count is cached), so the ops can be captured in CUDA graphs after one eager warm-up
step compiled them. Weight gradients are summed in a fixed order: results are deterministic.
Launch shapes were chosen from ptxas's register and spill counts (benchmarks/triton_compile.py);
their speed on a GPU is unmeasured.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl
from triton import knobs
from torch import Tensor, nn

from vqa_align.align.kernels.fused import _refuse_double_backward, apply_adversarial, apply_conditional_transport

# Launch shapes, chosen from ptxas's register and spill counts for sm_90 (benchmarks/triton_compile.py;
# compiled without a GPU, not timed): the forward kernels do not spill at 64 rows and 4 warps; the
# backward kernels hold their weight gradients on-chip and spill least at 16 rows and 8 warps; the
# transport kernels need 8 warps once a (sample, head)'s tile exceeds 128 x 16.
BLOCK_ROWS_FORWARD = 64  # rows per program of the helper forward kernels
BLOCK_ROWS_BACKWARD = 16  # rows per loop step of the backward kernels
# One (sample, head)'s transport matrices are single on-chip tiles: MCAN has <= 100 regions and
# 14 tokens. Longer sequences take the fused PyTorch path (see :func:`transport_fits`).
MAX_TRANSPORT_POSITIONS = 128
PROGRAMS_PER_SM = 2  # persistent backward kernels: enough programs to fill the GPU, few partial sums
INTERPRETER_PROGRAMS = 3  # CPU (Triton's interpreter, tests): several programs, to test the partial sums
MIN_DOT_BLOCK = 16  # tl.dot needs every block dimension >= 16
NORMALIZE_EPS = 1e-12  # F.normalize's eps
# The same numbers as constexprs: a @triton.jit function may read only constexpr globals.
_EPS = tl.constexpr(NORMALIZE_EPS)
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # clamps sums that are 0 only at padding
# Whether the kernels below are defined for Triton's CPU interpreter (TRITON_INTERPRET=1 when this
# module was imported: the tests); read once, as triton.jit does.
INTERPRETED = bool(knobs.runtime.interpret)
_INTERPRETED = tl.constexpr(INTERPRETED)
_FP32_DOT = tl.constexpr("ieee" if INTERPRETED else "tf32x3")  # the interpreter multiplies exactly anyway
NUM_WARPS = 4
NUM_WARPS_BACKWARD = 8  # the backward row kernels keep their weight gradients on-chip
SMALL_TRANSPORT_TILE = 128 * 16  # up to this many (query, key) pairs: 4 warps; above: 8


def transport_warps(n_q: int, n_k: int) -> int:
    return NUM_WARPS if _block(n_q) * _block(n_k) <= SMALL_TRANSPORT_TILE else 2 * NUM_WARPS


def _block(n: int) -> int:
    return max(MIN_DOT_BLOCK, triton.next_power_of_2(n))


def transport_fits(queries: Tensor, keys: Tensor) -> bool:
    """Whether CT's per-(sample, head) transport tile fits on-chip (both position counts <= 128)."""
    return max(queries.shape[-2], keys.shape[-2]) <= MAX_TRANSPORT_POSITIONS


@functools.cache
def _sm_count(index: int) -> int:  # cached: no device query inside a captured CUDA graph
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(n_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(n_blocks, cap))


@contextlib.contextmanager
def gpu_rounding_in_interpreter():
    """Within this context Triton's CPU interpreter rounds fp32 -> bf16 casts to nearest even, as
    the GPU does (``cvt.rn.bf16.f32``); as shipped (3.8.0) it truncates, which shrinks every rounded
    unit vector and biases CT's cost 1 - g(q)·g(k) upwards by up to bf16's step near 1. For the
    tests and benchmarks that run these kernels on the CPU; only that cast changes."""
    if not INTERPRETED:
        raise RuntimeError(
            "gpu_rounding_in_interpreter: these kernels were compiled, not interpreted (set TRITON_INTERPRET=1 "
            "before triton is imported)"
        )
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating_cast = builder.cast_impl

    @functools.wraps(truncating_cast)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)  # to nearest even
            return interpreter.TensorHandle(rounded.view(torch.uint16).numpy().reshape(src.data.shape), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = truncating_cast


def _dot_dtype(dtype: torch.dtype):
    """Triton dtype of the matmul operands for a compute dtype of :func:`compute_dtype`."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


# ----------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------
# A Triton kernel's first launch loads its binary (cuModuleLoadData), which the driver refuses while
# a stream is being captured, and train.cuda_graphs captures each new batch shape without an eager
# step of that shape first. So: (1) the integer arguments that change with the batch's shape are
# not specialized on (Triton would compile a variant per divisibility-by-16 and value-1 pattern),
# leaving one variant per model for every row kernel; (2) the transport kernels' tiles do change
# with the shape (BLOCK_Q, BLOCK_K in 16..128), so all their variants are launched once on dummy
# data at the first eager call (prepare_transport_variants; compiled once per machine, then read
# from Triton's disk cache).
SHAPE_ARGUMENTS = (
    "heads", "n_query_rows", "n_rows", "n_blocks", "n_q", "n_k", "sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n",
    "gq_b", "gq_h", "gq_n", "gk_b", "gk_h", "gk_n", "sg_b", "sg_h",
)  # fmt: skip
TRANSPORT_BLOCKS = (16, 32, 64, 128)  # every tile side _block() gives for 1..MAX_TRANSPORT_POSITIONS
MEAN_BLOCK = 64  # positions per step of the GAN's masked means (a loop: one variant for every shape)


def _kernel(fn):
    """triton.jit for a kernel, its shape-dependent integer arguments (SHAPE_ARGUMENTS) not specialized on."""
    names = inspect.signature(fn).parameters
    return triton.jit(do_not_specialize=[name for name in SHAPE_ARGUMENTS if name in names])(fn)


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, n_query_rows, n_rows, heads, n_q, n_k, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n):
    """Stacked row index (queries (b, h, i) first, then keys (b, h, j)) -> where the row lives.

    rows: (BLOCK_R,) int. Returns is_query, in_range, the row's offset into q and into k (only the
    one of its own tensor is meaningful), its sample b, position and (sample, head) index b·H + h.
    """
    in_range = rows < n_rows
    is_query = rows < n_query_rows
    local = tl.where(is_query, rows, rows - n_query_rows)
    n = tl.where(is_query, n_q, n_k)
    position = local % n
    bh = local // n
    b = bh // heads
    h = bh % heads
    offset_q = b * sq_b + h * sq_h + position * sq_n
    offset_k = b * sk_b + h * sk_h + position * sk_n
    return is_query, in_range, offset_q, offset_k, b, position, bh


@triton.jit
def _load_rows(q_ptr, k_ptr, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) fp32 rows from q or k; zero outside the rows and columns."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = (cols < d)[None, :]
    from_q = (is_query & in_range)[:, None] & col_ok
    from_k = ((~is_query) & in_range)[:, None] & col_ok
    xq = tl.load(q_ptr + offset_q[:, None] + cols[None, :] * sq_d, mask=from_q, other=0.0)
    xk = tl.load(k_ptr + offset_k[:, None] + cols[None, :] * sk_d, mask=from_k, other=0.0)
    return xq.to(tl.float32) + xk.to(tl.float32)


@triton.jit
def _store_rows(gq_ptr, gk_ptr, value, is_query, in_range, offset_q, offset_k, d, sq_d, sk_d, BLOCK_D: tl.constexpr):
    """Store (BLOCK_R, BLOCK_D) rows into gq or gk at the rows' offsets (the inverse of _load_rows)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = (cols < d)[None, :]
    to_q = (is_query & in_range)[:, None] & col_ok
    to_k = ((~is_query) & in_range)[:, None] & col_ok
    tl.store(gq_ptr + offset_q[:, None] + cols[None, :] * sq_d, value.to(gq_ptr.dtype.element_ty), mask=to_q)
    tl.store(gk_ptr + offset_k[:, None] + cols[None, :] * sk_d, value.to(gk_ptr.dtype.element_ty), mask=to_k)


@triton.jit
def _load_weight_t(w_ptr, n_out, n_in, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
    """nn.Linear weight W (n_out, n_in), row-major, as its transpose (BLOCK_IN, BLOCK_OUT) fp32, zero-padded."""
    i = tl.arange(0, BLOCK_IN)
    o = tl.arange(0, BLOCK_OUT)
    mask = (i[:, None] < n_in) & (o[None, :] < n_out)
    return tl.load(w_ptr + o[None, :] * n_in + i[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_vector(ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    return tl.load(ptr + i, mask=i < n, other=0.0).to(tl.float32)


@triton.jit
def _store_matrix(ptr, tile, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Store a (BLOCK_ROWS, BLOCK_COLS) tile as a row-major (n_rows, n_cols) matrix."""
    i = tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, BLOCK_COLS)
    tl.store(ptr + i[:, None] * n_cols + j[None, :], tile, mask=(i[:, None] < n_rows) & (j[None, :] < n_cols))


@triton.jit
def _store_vector(ptr, vector, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(ptr + i, vector, mask=i < n)


@triton.jit
def _operands(a, b, DOT: tl.constexpr):
    """a, b rounded to the compute dtype. Triton's CPU interpreter multiplies bf16 operands wrongly
    (checked with 3.8.0): there they go on as the fp32 values of the rounded numbers, which gives
    the same products (exact in fp32) and fp32 sums, as the tensor cores do."""
    a = a.to(DOT)
    b = b.to(DOT)
    if _INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _mm_acc(acc, a, b, DOT: tl.constexpr):
    """acc + a @ b, operands in the compute dtype, fp32 accumulator. fp32 operands go through the
    tensor cores as three TF32 products ("tf32x3": about fp32's accuracy, unlike plain TF32; exact
    "ieee" products compile to FMA loops that spill heavily, see benchmarks/triton_compile.py)."""
    a, b = _operands(a, b, DOT)
    if DOT == tl.float32:
        return tl.dot(a, b, acc, input_precision=_FP32_DOT)
    return tl.dot(a, b, acc)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with an fp32 result (see _mm_acc)."""
    return _mm_acc(tl.zeros((a.shape[0], b.shape[1]), tl.float32), a, b, DOT)


@triton.jit
def _normalize(raw):
    """Rows of raw (BLOCK_R, W) divided by max(|row|, eps), as F.normalize -> (unit, norm (BLOCK_R,))."""
    norm = tl.sqrt(tl.sum(raw * raw, axis=1))
    return raw / tl.maximum(norm, _EPS)[:, None], norm


@triton.jit
def _normalize_backward(grad_unit, unit, norm):
    """Backward of _normalize: d raw = (g - y (y·g)) / |raw| (where |raw| > eps, else g / eps)."""
    clamped = tl.maximum(norm, _EPS)
    projection = tl.where(norm > _EPS, tl.sum(unit * grad_unit, axis=1), 0.0)
    return (grad_unit - unit * projection[:, None]) / clamped[:, None]


@triton.jit
def _head_backward(grad_unit, unit, norm, hidden, inputs, w1, w2, acc_b1, acc_w1, acc_b2, acc_w2, d, width, r,
                   BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr, DOT: tl.constexpr):
    """Backward of normalise(Linear(ReLU(Linear(inputs)))), the navigator and the critic's MLP, for a
    block of rows: adds the rows' weight and bias gradients to the accumulators, returns d inputs
    (BLOCK_R, BLOCK_D) and the accumulators. ``width``: the hidden width."""
    grad_out = _normalize_backward(grad_unit, unit, norm)  # (BR, R)
    acc_b2 += tl.sum(grad_out, axis=0)
    acc_w2 = _mm_acc(acc_w2, tl.trans(grad_out), hidden, DOT)
    grad_hidden = _mm(grad_out, tl.trans(_load_weight_t(w2, r, width, BLOCK_H, BLOCK_OUT)), DOT)
    grad_hidden = tl.where(hidden > 0.0, grad_hidden, 0.0)  # (BR, H)
    acc_b1 += tl.sum(grad_hidden, axis=0)
    acc_w1 = _mm_acc(acc_w1, tl.trans(grad_hidden), inputs, DOT)
    grad_inputs = _mm(grad_hidden, tl.trans(_load_weight_t(w1, width, d, BLOCK_D, BLOCK_H)), DOT)
    return grad_inputs, acc_b1, acc_w1, acc_b2, acc_w2


@triton.jit
def _highway_forward(x, gate_w, gate_b, d, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """y = t ⊙ ReLU(W_h x) + (1 - t) ⊙ x, t = σ(W_t x); the gates' weight is (2d, d): rows [0, d)
    transform, [d, 2d) carry gate (alignment.Highway). x (BLOCK_R, BLOCK_D) -> y, transform, t."""
    transform = _mm(x, _load_weight_t(gate_w, d, d, BLOCK_D, BLOCK_D), DOT) + _load_vector(gate_b, d, BLOCK_D)[None, :]
    gate_logit = _mm(x, _load_weight_t(gate_w + d * d, d, d, BLOCK_D, BLOCK_D), DOT)
    gate = tl.sigmoid(gate_logit + _load_vector(gate_b + d, d, BLOCK_D)[None, :])
    return gate * tl.maximum(transform, 0.0) + (1.0 - gate) * x, transform, gate


@triton.jit
def _highway_backward(grad_y, x, transform, gate, gate_w, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b,
                      d, BLOCK_D: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    """Backward of :func:`_highway_forward` for one block of rows: adds this block's gradients of the
    gates' weight and bias to the on-chip accumulators -> dx (BLOCK_R, BLOCK_D) and the accumulators."""
    grad_transform = tl.where(transform > 0.0, grad_y * gate, 0.0)  # (BR, D)
    grad_gate = grad_y * (tl.maximum(transform, 0.0) - x) * gate * (1.0 - gate)  # d gate logit (BR, D)
    acc_transform_b += tl.sum(grad_transform, axis=0)
    acc_gate_b += tl.sum(grad_gate, axis=0)
    acc_transform_w = _mm_acc(acc_transform_w, tl.trans(grad_transform), x, DOT)
    acc_gate_w = _mm_acc(acc_gate_w, tl.trans(grad_gate), x, DOT)
    grad_x = grad_y * (1.0 - gate)  # the carry
    grad_x = _mm_acc(grad_x, grad_transform, tl.trans(_load_weight_t(gate_w, d, d, BLOCK_D, BLOCK_D)), DOT)
    grad_x = _mm_acc(grad_x, grad_gate, tl.trans(_load_weight_t(gate_w + d * d, d, d, BLOCK_D, BLOCK_D)), DOT)
    return grad_x, acc_transform_w, acc_transform_b, acc_gate_w, acc_gate_b


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

    # Flat order: nav_w1, nav_b1, nav_w2, nav_b2, gate_w, gate_b, crit_w1, crit_b1, crit_w2, crit_b2
    # (the gates' weight and bias: transform rows, then gate rows).
    out = partial_ptr + pid * n_weights
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
# Host side: autograd functions
# ----------------------------------------------------------------------------------------------


def _strides(x: Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())  # type: ignore[return-value]


def _mask_bytes(valid: Tensor) -> Tensor:
    """(B, N) bool mask as uint8 (the same bytes, no copy unless it is strided): kernels read bytes."""
    return valid.contiguous().view(torch.uint8)


def _split_weight_grads(partials: Tensor, weights: tuple[Tensor, ...]) -> list[Tensor]:
    """(P, n_weights) per-program sums -> one gradient per weight, in the weights' shapes (fp32)."""
    flat = partials.sum(0)  # one fixed-order reduction: deterministic
    return [g.view(w.shape) for g, w in zip(flat.split([w.numel() for w in weights]), weights, strict=True)]


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
    ``alignment_kernels._FusedConditionalTransport`` (weights: nav_w1, nav_b1, nav_w2, nav_b2,
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
        _refuse_double_backward("CT")
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


class TritonAdversarial(torch.autograd.Function):
    """GAN loss of :class:`~vqa_align.align.aligner.HeadAligner`: same arguments and results as
    ``alignment_kernels._FusedAdversarial`` (weights: gate_w, gate_b, w1, b1, w2, b2) -> (B, H) fp32."""

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
        _refuse_double_backward("GAN")
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


def triton_conditional_transport(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, navigator: nn.Sequential, critic: nn.Sequential,
    rho: float, precision: str = "fp32",
) -> Tensor:  # fmt: skip
    """``alignment_kernels.fused_conditional_transport`` in Triton -> (B, H) fp32 (Nq, Nk <= 128)."""
    return apply_conditional_transport(TritonConditionalTransport, queries, keys, q_valid, k_valid, navigator, critic,
                                       rho, precision)


def triton_adversarial_loss(
    queries: Tensor, keys: Tensor, q_valid: Tensor, k_valid: Tensor, discriminator: nn.Sequential, precision: str = "fp32"
) -> Tensor:
    """``alignment_kernels.fused_adversarial_loss`` in Triton -> (B, H) fp32."""
    return apply_adversarial(TritonAdversarial, queries, keys, q_valid, k_valid, discriminator, precision)
