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

// ---------------------------------------------------------------------------------------------
// Row kernels: rows [0, n) of width w, pointers at the first row of the block.
// ---------------------------------------------------------------------------------------------

template <typename io>
void normalize_block(typename io::raw* __restrict__ x, typename io::acc* __restrict__ norms, int64_t n, int64_t w) {
  using acc = typename io::acc;
  for (int64_t i = 0; i < n; ++i) {
    typename io::raw* __restrict__ row = x + i * w;
    acc squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < w; ++c) squares += io::load(row[c]) * io::load(row[c]);
    const acc norm = std::max(std::sqrt(squares), static_cast<acc>(kNormEps));
    const acc inverse = acc(1) / norm;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) row[c] = io::store(io::load(row[c]) * inverse);
    norms[i] = norm;
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

template <typename io>
void highway_forward_block(const typename io::raw* __restrict__ transform, const typename io::raw* __restrict__ gate,
                           const typename io::raw* __restrict__ x, typename io::raw* __restrict__ y, int64_t count) {
  using acc = typename io::acc;
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    const acc xv = io::load(x[k]);
    const acc activated = std::max(io::load(transform[k]), acc(0));
    y[k] = io::store(xv + io::load(gate[k]) * (activated - xv));
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

// x <- x / max(|x|, eps) row-wise; returns the clamped norms (rows,) in the accumulation dtype.
at::Tensor normalize_rows_(at::Tensor x) {
  check_rows(x, "x", x);
  const int64_t rows = x.size(0), width = x.size(1);
  at::Tensor norms = at::empty({rows}, x.options().dtype(acc_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "normalize_rows_", [&] {
    using io = Io<scalar_t>;
    auto* data = raw_ptr<scalar_t>(x);
    auto* norm_out = norms.data_ptr<typename io::acc>();
    at::parallel_for(0, rows, kBlockRows, [&](int64_t begin, int64_t end) {
      normalize_block<io>(data + begin * width, norm_out + begin, end - begin, width);
    });
  });
  return norms;
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

// Highway forward after its two matmuls: y = x + t ⊙ (relu(transform) - x), t = gate (already σ'd).
at::Tensor highway_forward(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& rows_in) {
  check_rows(rows_in, "rows", rows_in);
  check_same_shape(transform, "transform", rows_in);
  check_same_shape(gate, "gate", rows_in);
  at::Tensor out = at::empty_like(rows_in);
  const int64_t total = rows_in.numel(), grain = kBlockRows * std::max<int64_t>(1, rows_in.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, rows_in.scalar_type(), "highway_forward", [&] {
    using io = Io<scalar_t>;
    const auto* tr = raw_ptr<scalar_t>(transform);
    const auto* t = raw_ptr<scalar_t>(gate);
    const auto* x = raw_ptr<scalar_t>(rows_in);
    auto* y = raw_ptr<scalar_t>(out);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      highway_forward_block<io>(tr + begin, t + begin, x + begin, y + begin, end - begin);
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

}  // namespace

TORCH_LIBRARY(vqa_align_glue, m) {
  m.def("normalize_rows_(Tensor(a!) x) -> Tensor");
  m.def("normalize_backward_(Tensor(a!) grad, Tensor unit, Tensor norms) -> Tensor");
  m.def("leaky_relu_backward_(Tensor(a!) grad, Tensor activated, float slope) -> Tensor");
  m.def("highway_forward(Tensor transform, Tensor gate, Tensor rows) -> Tensor");
  m.def("highway_backward_(Tensor(a!) grad_out, Tensor gate, Tensor transform, Tensor rows, float input_sign) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqa_align_glue, CPU, m) {
  m.impl("normalize_rows_", &normalize_rows_);
  m.impl("normalize_backward_", &normalize_backward_);
  m.impl("leaky_relu_backward_", &leaky_relu_backward_);
  m.impl("highway_forward", &highway_forward);
  m.impl("highway_backward_", &highway_backward_);
}
