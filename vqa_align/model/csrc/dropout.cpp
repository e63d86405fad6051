// Counter-based dropout on the CPU (see vqa_align/model/dropout.py; built by vqa_align/model/native_dropout.py).
//
// Element k of one dropout call is kept with probability 1 - p, decided by the k-th output of
// SplitMix64 started at the call's seed: out_k = mix(seed + (k + 1)·γ). The mask is a pure
// function of (seed, k), so it is never stored: the backward pass applies the same op with the same
// seed to the incoming gradient. PyTorch's CPU dropout instead draws a float mask element by
// element (bernoulli_), stores it (4 bytes per element) and multiplies by it, forward and backward.
// The keep decision uses the top 24 bits of out_k, so p is honoured to 2^-24.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel work item
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

inline uint32_t splitmix64_high(uint64_t state) {
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

// out[k] = in[k] · scale where element k is kept, else 0; `threshold` = round(p · 2^24).
template <typename scalar_t, typename acc_t>
void dropout_range(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t begin, int64_t end,
                   uint64_t seed, uint32_t threshold, acc_t scale) {
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) {
    const uint32_t draw = splitmix64_high(seed + static_cast<uint64_t>(k + 1) * kGamma) >> 8;  // 24 bits
    const acc_t keep = draw >= threshold ? scale : acc_t(0);
    out[k] = static_cast<scalar_t>(static_cast<acc_t>(in[k]) * keep);
  }
}

at::Tensor counter_dropout(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), "counter_dropout: input must be a CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "counter_dropout: p must be in [0, 1), got ", p);
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::empty_like(in);
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));  // p · 2^24
  const int64_t total = in.numel();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.scalar_type(), "counter_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      dropout_range<scalar_t, acc_t>(src, dst, begin, end, static_cast<uint64_t>(seed), threshold, scale);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(vqa_align_dropout, m) {
  m.def("counter_dropout(Tensor input, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(vqa_align_dropout, CPU, m) {
  m.impl("counter_dropout", &counter_dropout);
}
