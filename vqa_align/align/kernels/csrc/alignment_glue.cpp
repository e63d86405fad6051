// Elementwise glue of the fused CT / GAN aligners on the CPU (see vqa_align/native_kernels.py).
//
// The helper networks run on B·H·(Nq+Nk) rows (102,400 for one MCAN-small decoder
// self-attention at batch 64). Their matmuls stay in ATen (oneDNN, AMX for bf16); what these
// kernels replace is the elementwise work between them, which PyTorch does as several passes
// over (rows, width) tensors, each allocating a fresh output. Each kernel here is one pass,
// works in place where it can, and folds the bias-gradient column sums into the same pass.
//
// Every tensor is a contiguous 2-D (rows, width) tensor of one floating dtype (float, double or
// bfloat16); arithmetic is in float (double for double). Column sums are accumulated per fixed
// block of rows and then added in block order, so results do not depend on the thread count.
// The pure-PyTorch equivalents in native_kernels.py are the reference the tests compare against.
//
// Layout: the row kernels (plain loops over raw pointers, `omp simd` so that they vectorise) come
// first; the ATen-facing ops below them check their arguments and dispatch on the dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 256;  // rows per work item and per column-sum block (thread-count independent)
constexpr double kNormEps = 1e-12;   // F.normalize's eps: x / max(|x|, eps)

// Element access through the accumulation type. bf16 is handled as raw uint16 bits, converted by a
// shift (exact) and round-to-nearest-even (NaN kept NaN), so that the loops vectorise.
template <typename T>
struct Io {
  using raw = T;
  using acc = T;
  static inline acc load(raw x) { return x; }
  static inline raw store(acc x) { return x; }
};

template <>
struct Io<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static inline float load(uint16_t x) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static inline uint16_t store(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return value != value ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
};

// exp in the accumulation type. float: range reduction x = n ln2 + r (Cody-Waite) and Cephes'
// degree-5 polynomial for exp(r), ~1 ulp, written so that the loops vectorise (std::exp does not
// without -ffast-math, which would also drop the NaN handling above); double: std::exp.
inline float exp_acc(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);  // exp stays a finite normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_acc(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// Row kernels: rows [0, n) of width w, pointers at the first row of the block.
// ---------------------------------------------------------------------------------------------

// x <- (x + bias) / max(|x + bias|, eps) row-wise. The biased row is rounded to the storage dtype
// before its norm is taken, as when the bias is added by a separate op.
template <typename io>
void normalize_block(typename io::raw* __restrict__ x, const typename io::acc* __restrict__ bias,
                     typename io::acc* __restrict__ norms, int64_t n, int64_t w) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
    typename io::raw* __restrict__ row = x + i * w;
    acc squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < w; ++c) {
      const auto biased = io::store(io::load(row[c]) + bias[c]);
      row[c] = biased;
      squares += io::load(biased) * io::load(biased);
    }
    const acc norm = std::max(std::sqrt(squares), static_cast<acc>(kNormEps));
    const acc inverse = acc(1) / norm;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) row[c] = io::store(io::load(row[c]) * inverse);
    norms[i] = norm;
  }
}

// y <- leaky_relu(y + bias, slope) (slope 0: ReLU, slope 1: the bias alone).
template <typename io>
void bias_leaky_relu_block(typename io::raw* __restrict__ y, const typename io::acc* __restrict__ bias, int64_t n,
                           int64_t w, typename io::acc slope) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const acc v = io::load(io::store(io::load(y[i * w + c]) + bias[c]));  // rounded as a separate bias add
      y[i * w + c] = io::store(v > acc(0) ? v : v * slope);
    }
  }
}

template <typename io>
void normalize_backward_block(typename io::raw* __restrict__ g, const typename io::raw* __restrict__ u,
                              const typename io::acc* __restrict__ norms, typename io::acc* __restrict__ colsum,
                              int64_t n, int64_t w) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
    typename io::raw* __restrict__ gr = g + i * w;
    const typename io::raw* __restrict__ ur = u + i * w;
    acc along = 0;
#pragma omp simd reduction(+ : along)
    for (int64_t c = 0; c < w; ++c) along += io::load(ur[c]) * io::load(gr[c]);
    if (norms[i] <= static_cast<acc>(kNormEps)) along = 0;  // clamped norm: x / eps is linear in x
    const acc inverse = acc(1) / norms[i];
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const auto out = io::store((io::load(gr[c]) - io::load(ur[c]) * along) * inverse);
      gr[c] = out;
      colsum[c] += io::load(out);
    }
  }
}

template <typename io>
void leaky_relu_backward_block(typename io::raw* __restrict__ g, const typename io::raw* __restrict__ a,
                               typename io::acc* __restrict__ colsum, int64_t n, int64_t w, typename io::acc slope) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const acc scale = io::load(a[i * w + c]) > acc(0) ? acc(1) : slope;
      const auto out = io::store(io::load(g[i * w + c]) * scale);
      g[i * w + c] = out;
      colsum[c] += io::load(out);
    }
  }
}

// transform <- transform + b_h; gate <- σ(gate + b_t); y = x + t ⊙ (relu(transform) - x) with t the
// stored (rounded) gate, as the backward pass sees it.
template <typename io>
void highway_forward_block(typename io::raw* __restrict__ transform, const typename io::acc* __restrict__ bias_h,
                           typename io::raw* __restrict__ gate, const typename io::acc* __restrict__ bias_t,
                           const typename io::raw* __restrict__ x, typename io::raw* __restrict__ y, int64_t n,
                           int64_t w) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
    typename io::raw* __restrict__ tr = transform + i * w;
    typename io::raw* __restrict__ g = gate + i * w;
    const typename io::raw* __restrict__ xr = x + i * w;
    typename io::raw* __restrict__ yr = y + i * w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const auto biased = io::store(io::load(tr[c]) + bias_h[c]);
      const auto t = io::store(acc(1) / (acc(1) + exp_acc(-(io::load(g[c]) + bias_t[c]))));
      const acc xv = io::load(xr[c]);
      tr[c] = biased;
      g[c] = t;
      yr[c] = io::store(xv + io::load(t) * (std::max(io::load(biased), acc(0)) - xv));
    }
  }
}

// One (Nq, Nk) transport matrix, forward: E <- exp(S) ⊙ [q valid] ⊙ [k valid] (E holds S on entry),
// C <- 1 - C (C holds g(q)·g(k) on entry); row and column sums of E and of E ⊙ C (unrounded).
template <typename io>
void transport_forward_matrix(typename io::raw* __restrict__ e, typename io::raw* __restrict__ cost,
                              const bool* __restrict__ q_valid, const typename io::acc* __restrict__ k_mask,
                              typename io::acc* __restrict__ row_sum, typename io::acc* __restrict__ col_sum,
                              typename io::acc* __restrict__ row_cost, typename io::acc* __restrict__ col_cost,
                              int64_t nq, int64_t nk) {
  using acc = typename io::acc;
  for (int64_t j = 0; j < nk; ++j) col_sum[j] = col_cost[j] = acc(0);
  for (int64_t i = 0; i < nq; ++i) {
    typename io::raw* __restrict__ er = e + i * nk;
    typename io::raw* __restrict__ cr = cost + i * nk;
    const acc row_valid = q_valid[i] ? acc(1) : acc(0);
    acc rs = 0, rc = 0;
#pragma omp simd reduction(+ : rs, rc)
    for (int64_t j = 0; j < nk; ++j) {
      const acc ev = exp_acc(io::load(er[j])) * (k_mask[j] * row_valid);
      const acc cv = acc(1) - io::load(cr[j]);
      er[j] = io::store(ev);
      cr[j] = io::store(cv);
      rs += ev;
      rc += ev * cv;
      col_sum[j] += ev;
      col_cost[j] += ev * cv;
    }
    row_sum[i] = rs;
    row_cost[i] = rc;
  }
}

// One transport matrix, backward: P = E ⊙ (α_i + β_j) and dS = P ⊙ C - E ⊙ (a_i + b_j).
template <typename io>
void transport_backward_matrix(const typename io::raw* __restrict__ e, const typename io::raw* __restrict__ cost,
                               const typename io::acc* __restrict__ alpha, const typename io::acc* __restrict__ beta,
                               const typename io::acc* __restrict__ a, const typename io::acc* __restrict__ b,
                               typename io::raw* __restrict__ plan, typename io::raw* __restrict__ grad_logits,
                               int64_t nq, int64_t nk) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t o = i * nk;
    const acc ai = alpha[i], ci = a[i];
#pragma omp simd
    for (int64_t j = 0; j < nk; ++j) {
      const acc ev = io::load(e[o + j]);
      const acc pv = ev * (ai + beta[j]);
      plan[o + j] = io::store(pv);
      grad_logits[o + j] = io::store(pv * io::load(cost[o + j]) - ev * (ci + b[j]));
    }
  }
}

template <typename io>
void highway_backward_block(typename io::raw* __restrict__ g, const typename io::raw* __restrict__ gate,
                            const typename io::raw* __restrict__ transform, const typename io::raw* __restrict__ x,
                            typename io::raw* __restrict__ grad_transform, typename io::raw* __restrict__ grad_gate,
                            typename io::acc* __restrict__ colsum, int64_t n, int64_t w, typename io::acc sign) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = i * w;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const acc gv = io::load(g[o + c]), t = io::load(gate[o + c]), tr = io::load(transform[o + c]);
      const acc through_gate = gv * t;
      const auto d_transform = io::store(tr > acc(0) ? through_gate : acc(0));
      const auto d_gate = io::store(gv * (std::max(tr, acc(0)) - io::load(x[o + c])) * t * (acc(1) - t));
      grad_transform[o + c] = d_transform;
      grad_gate[o + c] = d_gate;
      g[o + c] = io::store(sign * (gv - through_gate));
      colsum[c] += io::load(d_transform);
      colsum[w + c] += io::load(d_gate);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Blocking, argument checks
// ---------------------------------------------------------------------------------------------

// Calls block(first_row, n_rows, colsum) for fixed blocks of rows in parallel, each with its own
// zeroed (sum_width,) slot; returns the slots added in block order (sum_width,) as out_type.
template <typename acc_t, typename Block>
at::Tensor blocked_column_sums(int64_t rows, int64_t sum_width, at::ScalarType out_type, const Block& block) {
  const int64_t blocks = std::max<int64_t>(1, (rows + kBlockRows - 1) / kBlockRows);
  std::vector<acc_t> partial(static_cast<size_t>(blocks * sum_width), acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * kBlockRows;
      block(begin, std::min(rows, begin + kBlockRows) - begin, partial.data() + b * sum_width);
    }
  });
  at::Tensor sums = at::zeros({sum_width}, at::TensorOptions().dtype(out_type));
  acc_t* out = sums.data_ptr<acc_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    const acc_t* p = partial.data() + b * sum_width;
    for (int64_t c = 0; c < sum_width; ++c) out[c] += p[c];
  }
  return sums;
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "alignment_glue: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "alignment_glue: ", name, " must be a contiguous 2-D tensor, got ",
              t.sizes(), (t.is_contiguous() ? "" : " (not contiguous)"));
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "alignment_glue: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_rows(t, name, like);
  TORCH_CHECK(t.sizes() == like.sizes(), "alignment_glue: ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename scalar_t>
typename Io<scalar_t>::raw* raw_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Io<scalar_t>::raw*>(t.data_ptr<scalar_t>());
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

// A (width,) bias in the accumulation dtype.
at::Tensor checked_bias(const at::Tensor& bias, const at::Tensor& rows) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == rows.size(1), "alignment_glue: bias has shape ", bias.sizes(),
              ", expected (", rows.size(1), ",)");
  return bias.to(acc_type(rows.scalar_type())).contiguous();
}

// x <- (x + bias) / max(|x + bias|, eps) row-wise; returns the clamped norms (rows,) in the
// accumulation dtype.
at::Tensor normalize_rows_(at::Tensor x, const at::Tensor& bias) {
  check_rows(x, "x", x);
  const int64_t rows = x.size(0), width = x.size(1);
  const at::Tensor b = checked_bias(bias, x);
  at::Tensor norms = at::empty({rows}, x.options().dtype(acc_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "normalize_rows_", [&] {
    using io = Io<scalar_t>;
    auto* data = raw_ptr<scalar_t>(x);
    const auto* bias_data = b.data_ptr<typename io::acc>();
    auto* norm_out = norms.data_ptr<typename io::acc>();
    at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
      normalize_block<io>(data + begin * width, bias_data, norm_out + begin, end - begin, width);
    });
  });
  return norms;
}

// y <- leaky_relu(y + bias, slope), in place.
void bias_leaky_relu_(at::Tensor y, const at::Tensor& bias, double slope) {
  check_rows(y, "y", y);
  const int64_t rows = y.size(0), width = y.size(1);
  const at::Tensor b = checked_bias(bias, y);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "bias_leaky_relu_", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    auto* data = raw_ptr<scalar_t>(y);
    const auto* bias_data = b.data_ptr<acc_t>();
    at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
      bias_leaky_relu_block<io>(data + begin * width, bias_data, end - begin, width, static_cast<acc_t>(slope));
    });
  });
}

// Backward of x / max(|x|, eps): grad <- (grad - u (u·grad)) / |x| where |x| > eps, else grad / eps.
// Returns the column sums of the new grad (the bias gradient of the linear layer that made x).
at::Tensor normalize_backward_(at::Tensor grad, const at::Tensor& unit, const at::Tensor& norms) {
  check_rows(grad, "grad", grad);
  check_same_shape(unit, "unit", grad);
  const int64_t rows = grad.size(0), width = grad.size(1);
  const at::ScalarType acc = acc_type(grad.scalar_type());
  TORCH_CHECK(norms.dim() == 1 && norms.size(0) == rows && norms.is_contiguous() && norms.scalar_type() == acc,
              "alignment_glue: norms must be a contiguous (", rows, ",) ", acc, " tensor, got ", norms.sizes(), " ",
              norms.scalar_type());
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "normalize_backward_", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    auto* g = raw_ptr<scalar_t>(grad);
    const auto* u = raw_ptr<scalar_t>(unit);
    const auto* n = norms.data_ptr<acc_t>();
    sums = blocked_column_sums<acc_t>(rows, width, acc, [&](int64_t begin, int64_t count, acc_t* colsum) {
      normalize_backward_block<io>(g + begin * width, u + begin * width, n + begin, colsum, count, width);
    });
  });
  return sums;
}

// grad <- grad * (activated > 0 ? 1 : slope), for activated = (leaky) ReLU output (its sign is the
// pre-activation's); returns the column sums of the new grad (the bias gradient of that layer).
at::Tensor leaky_relu_backward_(at::Tensor grad, const at::Tensor& activated, double slope) {
  check_rows(grad, "grad", grad);
  check_same_shape(activated, "activated", grad);
  const int64_t rows = grad.size(0), width = grad.size(1);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "leaky_relu_backward_", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    auto* g = raw_ptr<scalar_t>(grad);
    const auto* a = raw_ptr<scalar_t>(activated);
    sums = blocked_column_sums<acc_t>(rows, width, acc_type(grad.scalar_type()), [&](int64_t begin, int64_t count, acc_t* colsum) {
      leaky_relu_backward_block<io>(g + begin * width, a + begin * width, colsum, count, width, static_cast<acc_t>(slope));
    });
  });
  return sums;
}

// Highway forward after its two matmuls (without their biases): transform <- transform + b_h and
// gate <- σ(gate + b_t), in place (both are kept for the backward pass); returns
// y = x + t ⊙ (relu(transform) - x) with t = gate.
at::Tensor highway_forward_(at::Tensor transform, const at::Tensor& bias_h, at::Tensor gate, const at::Tensor& bias_t,
                            const at::Tensor& rows_in) {
  check_rows(rows_in, "rows", rows_in);
  check_same_shape(transform, "transform", rows_in);
  check_same_shape(gate, "gate", rows_in);
  const at::Tensor bh = checked_bias(bias_h, rows_in), bt = checked_bias(bias_t, rows_in);
  at::Tensor out = at::empty_like(rows_in);
  const int64_t rows = rows_in.size(0), width = rows_in.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows_in.scalar_type(), "highway_forward_", [&] {
    using io = Io<scalar_t>;
    auto* tr = raw_ptr<scalar_t>(transform);
    auto* t = raw_ptr<scalar_t>(gate);
    const auto* x = raw_ptr<scalar_t>(rows_in);
    auto* y = raw_ptr<scalar_t>(out);
    const auto* bh_data = bh.data_ptr<typename io::acc>();
    const auto* bt_data = bt.data_ptr<typename io::acc>();
    at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
      const int64_t o = begin * width;
      highway_forward_block<io>(tr + o, bh_data, t + o, bt_data, x + o, y + o, end - begin, width);
    });
  });
  return out;
}

// Highway backward before its two matmuls. With g = dL/dy, t = gate, h = relu(transform):
//   dL/dtransform = g t [transform > 0],  dL/d(gate pre-activation) = g (h - x) t (1 - t),
//   direct path dL/dx = g (1 - t), times input_sign (-1: a gradient reversal on x), written over
//   grad_out. Returns (dL/dtransform, dL/dgate_pre, their column sums (2·width,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> highway_backward_(
    at::Tensor grad_out, const at::Tensor& gate, const at::Tensor& transform, const at::Tensor& rows_in,
    double input_sign) {
  check_rows(grad_out, "grad_out", grad_out);
  check_same_shape(gate, "gate", grad_out);
  check_same_shape(transform, "transform", grad_out);
  check_same_shape(rows_in, "rows", grad_out);
  TORCH_CHECK(input_sign == 1.0 || input_sign == -1.0, "alignment_glue: input_sign must be +1 or -1, got ", input_sign);
  const int64_t rows = grad_out.size(0), width = grad_out.size(1);
  at::Tensor grad_transform = at::empty_like(grad_out);
  at::Tensor grad_gate = at::empty_like(grad_out);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(), "highway_backward_", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    auto* g = raw_ptr<scalar_t>(grad_out);
    const auto* t = raw_ptr<scalar_t>(gate);
    const auto* tr = raw_ptr<scalar_t>(transform);
    const auto* x = raw_ptr<scalar_t>(rows_in);
    auto* gtr = raw_ptr<scalar_t>(grad_transform);
    auto* gg = raw_ptr<scalar_t>(grad_gate);
    sums = blocked_column_sums<acc_t>(rows, 2 * width, acc_type(grad_out.scalar_type()), [&](int64_t begin, int64_t count, acc_t* colsum) {
      const int64_t o = begin * width;
      highway_backward_block<io>(g + o, t + o, tr + o, x + o, gtr + o, gg + o, colsum, count, width,
                                 static_cast<acc_t>(input_sign));
    });
  });
  return {grad_transform, grad_gate, sums};
}

void check_matrices(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(), "alignment_glue: ", name,
              " must be a contiguous (B, H, Nq, Nk) CPU tensor, got ", t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "alignment_glue: ", name,
              " has shape ", t.sizes(), " and dtype ", t.scalar_type(), ", expected ", like.sizes(), " ",
              like.scalar_type());
}

void check_vectors(const at::Tensor& t, const char* name, int64_t batch, int64_t heads, int64_t n, at::ScalarType type) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == heads && t.size(2) == n && t.is_contiguous() &&
                  t.scalar_type() == type,
              "alignment_glue: ", name, " must be a contiguous (", batch, ", ", heads, ", ", n, ") ", type,
              " tensor, got ", t.sizes(), " ", t.scalar_type());
}

// Transport forward: logits <- E = exp(S) ⊙ valid pairs, cost_dots <- C = 1 - cost_dots (in place),
// with S = f(q)·f(k) and cost_dots = g(q)·g(k) (B, H, Nq, Nk). Returns the row sums (B, H, Nq) and column sums
// (B, H, Nk) of E and of E ⊙ C, in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transport_forward_(
    at::Tensor logits, at::Tensor cost_dots, const at::Tensor& q_valid, const at::Tensor& k_valid) {
  const at::Tensor& e = logits;
  check_matrices(e, "logits", e);
  check_matrices(cost_dots, "cost_dots", e);
  const int64_t batch = e.size(0), heads = e.size(1), nq = e.size(2), nk = e.size(3);
  TORCH_CHECK(q_valid.scalar_type() == at::kBool && q_valid.dim() == 2 && q_valid.size(0) == batch &&
                  q_valid.size(1) == nq && k_valid.scalar_type() == at::kBool && k_valid.dim() == 2 &&
                  k_valid.size(0) == batch && k_valid.size(1) == nk,
              "alignment_glue: q_valid / k_valid must be bool (B, Nq) / (B, Nk), got ", q_valid.sizes(), " ",
              q_valid.scalar_type(), " / ", k_valid.sizes(), " ", k_valid.scalar_type());
  const at::Tensor qv = q_valid.contiguous(), kv = k_valid.contiguous();
  const auto options = e.options().dtype(acc_type(e.scalar_type()));
  at::Tensor row_sum = at::empty({batch, heads, nq}, options), row_cost = at::empty({batch, heads, nq}, options);
  at::Tensor col_sum = at::empty({batch, heads, nk}, options), col_cost = at::empty({batch, heads, nk}, options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, e.scalar_type(), "transport_forward_", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    auto* ep = raw_ptr<scalar_t>(e);
    auto* cp = raw_ptr<scalar_t>(cost_dots);
    const bool* qp = qv.data_ptr<bool>();
    const bool* kp = kv.data_ptr<bool>();
    acc_t *rs = row_sum.data_ptr<acc_t>(), *rc = row_cost.data_ptr<acc_t>();
    acc_t *cs = col_sum.data_ptr<acc_t>(), *cc = col_cost.data_ptr<acc_t>();
    at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
      std::vector<acc_t> k_mask(static_cast<size_t>(nk));
      int64_t mask_sample = -1;
      for (int64_t m = first; m < last; ++m) {
        const int64_t b = m / heads;
        if (b != mask_sample) {  // the key mask as numbers, once per sample
          for (int64_t j = 0; j < nk; ++j) k_mask[j] = kp[b * nk + j] ? acc_t(1) : acc_t(0);
          mask_sample = b;
        }
        transport_forward_matrix<io>(ep + m * nq * nk, cp + m * nq * nk, qp + b * nq, k_mask.data(), rs + m * nq,
                                     cs + m * nk, rc + m * nq, cc + m * nk, nq, nk);
      }
    });
  });
  return {row_sum, col_sum, row_cost, col_cost};
}

// Transport backward: plan = E ⊙ (α_i + β_j), grad_logits = plan ⊙ C - E ⊙ (a_i + b_j), with
// α, a (B, H, Nq) and β, b (B, H, Nk) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> transport_backward(const at::Tensor& e, const at::Tensor& cost,
                                                      const at::Tensor& alpha, const at::Tensor& beta,
                                                      const at::Tensor& a, const at::Tensor& b) {
  check_matrices(e, "e", e);
  check_matrices(cost, "cost", e);
  const int64_t batch = e.size(0), heads = e.size(1), nq = e.size(2), nk = e.size(3);
  const at::ScalarType acc = acc_type(e.scalar_type());
  check_vectors(alpha, "alpha", batch, heads, nq, acc);
  check_vectors(a, "a", batch, heads, nq, acc);
  check_vectors(beta, "beta", batch, heads, nk, acc);
  check_vectors(b, "b", batch, heads, nk, acc);
  at::Tensor plan = at::empty_like(e), grad_logits = at::empty_like(e);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, e.scalar_type(), "transport_backward", [&] {
    using io = Io<scalar_t>;
    using acc_t = typename io::acc;
    const auto* ep = raw_ptr<scalar_t>(e);
    const auto* cp = raw_ptr<scalar_t>(cost);
    const acc_t *al = alpha.data_ptr<acc_t>(), *be = beta.data_ptr<acc_t>(), *ap = a.data_ptr<acc_t>(), *bp = b.data_ptr<acc_t>();
    auto* pp = raw_ptr<scalar_t>(plan);
    auto* gp = raw_ptr<scalar_t>(grad_logits);
    at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
      for (int64_t m = first; m < last; ++m) {
        const int64_t o = m * nq * nk;
        transport_backward_matrix<io>(ep + o, cp + o, al + m * nq, be + m * nk, ap + m * nq, bp + m * nk, pp + o,
                                      gp + o, nq, nk);
      }
    });
  });
  return {plan, grad_logits};
}

}  // namespace

TORCH_LIBRARY(vqa_align_glue, m) {
  m.def("normalize_rows_(Tensor(a!) x, Tensor bias) -> Tensor");
  m.def("bias_leaky_relu_(Tensor(a!) y, Tensor bias, float slope) -> ()");
  m.def("normalize_backward_(Tensor(a!) grad, Tensor unit, Tensor norms) -> Tensor");
  m.def("leaky_relu_backward_(Tensor(a!) grad, Tensor activated, float slope) -> Tensor");
  m.def("highway_forward_(Tensor(a!) transform, Tensor bias_h, Tensor(b!) gate, Tensor bias_t, Tensor rows) -> Tensor");
  m.def("highway_backward_(Tensor(a!) grad_out, Tensor gate, Tensor transform, Tensor rows, float input_sign) -> (Tensor, Tensor, Tensor)");
  m.def("transport_forward_(Tensor(a!) logits, Tensor(b!) cost_dots, Tensor q_valid, Tensor k_valid) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("transport_backward(Tensor e, Tensor cost, Tensor alpha, Tensor beta, Tensor a, Tensor b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqa_align_glue, CPU, m) {
  m.impl("normalize_rows_", &normalize_rows_);
  m.impl("bias_leaky_relu_", &bias_leaky_relu_);
  m.impl("normalize_backward_", &normalize_backward_);
  m.impl("leaky_relu_backward_", &leaky_relu_backward_);
  m.impl("highway_forward_", &highway_forward_);
  m.impl("highway_backward_", &highway_backward_);
  m.impl("transport_forward_", &transport_forward_);
  m.impl("transport_backward", &transport_backward);
}
