"""What the Triton kernels of CT (:mod:`.triton_ct`) and GAN (:mod:`.triton_gan`) share: launch
shapes, the @triton.jit device functions both inline (row addressing, loads and stores, matmuls,
normalisation, the highway layer and a Linear-ReLU-Linear head with their backward passes) and the
host-side helpers. Importing this module imports Triton: it is imported only when Triton kernels
are selected (:func:`vqa_align.align.distances.implementation`).

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

import functools
import inspect

import torch
import triton
import triton.language as tl
from triton import knobs
from torch import Tensor

# Launch shapes, chosen from ptxas's register and spill counts for sm_90 (benchmarks/triton_compile.py;
# compiled without a GPU, not timed): the forward kernels do not spill at 64 rows and 4 warps; the
# backward kernels hold their weight gradients on-chip and spill least at 16 rows and 8 warps; the
# transport kernels need 8 warps once a (sample, head)'s tile exceeds 128 x 16.
BLOCK_ROWS_FORWARD = 64  # rows per program of the helper forward kernels
BLOCK_ROWS_BACKWARD = 16  # rows per loop step of the backward kernels
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


def _block(n: int) -> int:
    return max(MIN_DOT_BLOCK, triton.next_power_of_2(n))



@functools.cache
def _sm_count(index: int) -> int:  # cached: no device query inside a captured CUDA graph
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(n_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        cap = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = INTERPRETER_PROGRAMS
    return max(1, min(n_blocks, cap))



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
