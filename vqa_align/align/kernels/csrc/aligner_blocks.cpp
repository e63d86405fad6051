// The CT and GAN aligners on the CPU, cache-blocked: every helper layer of a block of rows (and, for
// CT, the transport of one (sample, head)) runs while its data sits in the core's cache, with the
// matmuls on AMX tiles (bf16 operands, fp32 accumulation).
//
// Why: the helper networks run on B·H·(Nq+Nk) rows (102,400 for one MCAN-small decoder
// self-attention at batch 64) with widths of 32-128. As separate ATen ops (alignment_glue.cpp) every
// layer is a pass over memory, a matmul writing a (rows, width) tensor and a glue pass reading it
// back, about 11 KB of traffic per row for forward and backward. Here a block of kBlockRows rows goes
// through every layer in cache: what reaches memory is the input rows, the helpers' outputs, the
// incoming gradients and the row gradients, about 1 KB per row. The backward passes recompute the
// block's activations instead of storing them. Library GEMM calls at these sizes (64 x 64 x 64)
// cost more in dispatch and tile configuration than in arithmetic, so the matmul is a small AMX
// kernel with one tile configuration per thread (`gemm`).
//
// Math (as vqa_align/alignment_kernels.py's layer-by-layer path; rows x are queries, then keys):
//   CT navigator        f = normalize(W2 relu(W1 x + b1) + b2)
//   highway (CT critic, GAN discriminator)
//                       h = x + t ⊙ (relu(Wt x + bt) - x), t = σ(Wg x + bg)   (gate_w = [Wt; Wg])
//   CT critic           g = normalize(V2 relu(V1 h + c1) + c2)
//   CT transport        per (sample, head): S = f(q) f(k)ᵀ, C = 1 - g(q) g(k)ᵀ, E = exp(S) on valid
//                       pairs; forward: row/column sums of E and E ⊙ C; backward: dS f, dSᵀ f, P g, Pᵀ g
//   GAN discriminator   logit = w2 · leaky_relu(V h + c) + b2
// Matmul operands are bf16, accumulation and all elementwise work fp32; activations are rounded to
// bf16 only where they feed a matmul. Weight and bias gradients are summed in fp32 per fixed group
// of blocks, then the groups in order, so results do not depend on the thread count.
//
// Built when the compiler targets AVX-512-BF16 and AMX (-march=native on such a CPU) on Linux, and
// used when the kernel grants the process the AMX tile state and every helper width is a multiple
// of 32 (helper_blocks_supported); elsewhere the ops raise and the Python side runs the
// layer-by-layer path. Tests: tests/test_aligner_blocks.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#define VQA_ALIGN_ALIGNER_BLOCKS 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kBlockRows = 64;   // rows per block (measured: 64 beats 32 and 128); its buffers stay in L2
constexpr int64_t kMaxGroups = 16;    // weight-gradient accumulators (fixed: thread-count independent)
constexpr float kNormEps = 1e-12f;    // F.normalize's eps

constexpr int64_t kWidthMultiple = 32;  // the matmul's tile blocking (32 rows, columns and depth)

// Every helper width (head dim, hidden and output widths) a positive multiple of kWidthMultiple.
bool widths_supported(c10::ArrayRef<int64_t> widths) {
  for (const int64_t w : widths)
    if (w <= 0 || w % kWidthMultiple != 0) return false;
  return true;
}

#ifdef VQA_ALIGN_ALIGNER_BLOCKS

using bf16 = at::BFloat16;

// ---------------------------------------------------------------------------------------------
// 16-lane helpers
// ---------------------------------------------------------------------------------------------

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(bf16* p, __m512 v) {  // round to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// exp: x = n ln2 + r, Cephes' degree-5 polynomial for exp(r) (as exp_acc in alignment_glue.cpp).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// 1 / x: the 14-bit estimate and one Newton step (~full fp32 precision; a divide costs ~16 cycles).
inline __m512 reciprocal16(__m512 x) {
  const __m512 y = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(x, y, _mm512_set1_ps(2.0f)));
}

// The rows of a (B, H, N, w) tensor whose last dimension has unit stride, in (b, h, i) order: the
// attention's q and k are transposed views of (B, N, H·w) projections, read and written in place.
template <typename T>
struct StridedRows {
  T* base;
  int64_t heads, n, stride_b, stride_h, stride_n;
  T* row(int64_t index) const {
    const int64_t i = index % n, bh = index / n;
    return base + (bh / heads) * stride_b + (bh % heads) * stride_h + i * stride_n;
  }
};

template <typename T>
StridedRows<T> strided_rows(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2)};
}

// dst (n_rows, w) bf16 <- rows [row0, row0 + n_valid) of src (float or bf16); rows beyond n_valid zeroed.
template <typename T>
void load_rows(bf16* dst, const StridedRows<const T>& src, int64_t row0, int64_t n_valid, int64_t n_rows, int64_t w) {
  for (int64_t i = 0; i < n_valid; ++i) {
    const T* row = src.row(row0 + i);
    for (int64_t c = 0; c < w; c += 16) store16(dst + i * w + c, load16(row + c));
  }
  std::fill(dst + n_valid * w, dst + n_rows * w, bf16(0.0f));
}

// ---------------------------------------------------------------------------------------------
// AMX matmul. One tile configuration for the whole kernel (8 tiles of 16 rows x 64 bytes), set once
// per thread: a library GEMM call per layer and block (ATen's brgemm) reconfigures the tiles and
// looks its kernel up on every call, which at these sizes (128 x 64 x 64) costs more than the
// arithmetic.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTile = 16;  // tile rows; a tile row is 64 bytes: 16 fp32 or 32 bf16

bool amx_permitted() {  // Linux hands out the AMX tile state only on request, once per process
  static const bool permitted = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

constexpr TileConfig all_tiles_full() {
  TileConfig config{};
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTile;
  }
  return config;
}

// A namespace-scope object: GCC may treat a stack copy as dead stores before ldtilecfg (seen at -O2).
const TileConfig kTileConfig = all_tiles_full();

void configure_tiles() { _tile_loadconfig(&kTileConfig); }

// 16 bf16 of an even row and 16 of the odd row after it -> their 16 (even, odd) pairs as 32-bit words.
inline __m512i interleave(__m256i even, __m256i odd) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
}

// B operand layout: a (k, n) bf16 matrix with its rows in pairs, (k/2, n, 2) ("VNNI"). k even, n a
// multiple of 16.
void pack_vnni(bf16* dst, const bf16* src, int64_t k, int64_t n) {
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t row = 0; row < k; row += 2) {
    const bf16* even = src + row * n;
    const bf16* odd = even + n;
    for (int64_t c = 0; c < n; c += 16) {
      _mm512_storeu_si512(out + (row / 2) * n + c,
                          interleave(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + c))));
    }
  }
}

// C (m, n) fp32 (row stride ldc) = A (m, k) bf16 (row stride lda) · B (k, n; pack_vnni), or += when
// accumulate. m, n and k multiples of 32; the tiles must be configured (configure_tiles). The
// layers here are narrow (k of 32-128), so each output tile gets only k/32 multiply instructions and
// tile loads and stores dominate: for k <= 64 the 32-row block's A tiles stay loaded across all of
// its columns (measured 3-20 % faster than 2 x 2 blocks at these shapes); deeper products use
// 2 x 2 blocks of 16 x 16 output tiles.
void gemm(float* c, int64_t ldc, const bf16* a, int64_t lda, int64_t m, const bf16* b, int64_t k, int64_t n,
          bool accumulate) {
  const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = n * 4;  // bytes
  if (k <= 2 * kTile * 2) {  // A resident: tiles 4-7 hold A (2 row tiles x k/32), 0-1 C, 2-3 B
    const bool two_steps = k > 2 * kTile;
    for (int64_t m0 = 0; m0 < m; m0 += 2 * kTile) {
      const bf16* a0 = a + m0 * lda;
      _tile_loadd(4, a0, a_stride);
      _tile_loadd(5, a0 + kTile * lda, a_stride);
      if (two_steps) {
        _tile_loadd(6, a0 + 2 * kTile, a_stride);
        _tile_loadd(7, a0 + kTile * lda + 2 * kTile, a_stride);
      }
      for (int64_t n0 = 0; n0 < n; n0 += kTile) {
        float* c0 = c + m0 * ldc + n0;
        float* c1 = c0 + kTile * ldc;
        if (accumulate) {
          _tile_loadd(0, c0, c_stride);
          _tile_loadd(1, c1, c_stride);
        } else {
          _tile_zero(0);
          _tile_zero(1);
        }
        const bf16* b0 = b + n0 * 2;
        _tile_loadd(2, b0, b_stride);
        _tile_dpbf16ps(0, 4, 2);
        _tile_dpbf16ps(1, 5, 2);
        if (two_steps) {
          _tile_loadd(3, b0 + kTile * n * 2, b_stride);
          _tile_dpbf16ps(0, 6, 3);
          _tile_dpbf16ps(1, 7, 3);
        }
        _tile_stored(0, c0, c_stride);
        _tile_stored(1, c1, c_stride);
      }
    }
    return;
  }
  for (int64_t m0 = 0; m0 < m; m0 += 2 * kTile)
    for (int64_t n0 = 0; n0 < n; n0 += 2 * kTile) {
      float* c00 = c + m0 * ldc + n0;
      float* c10 = c00 + kTile * ldc;
      if (accumulate) {
        _tile_loadd(0, c00, c_stride);
        _tile_loadd(1, c00 + kTile, c_stride);
        _tile_loadd(2, c10, c_stride);
        _tile_loadd(3, c10 + kTile, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < k; k0 += 2 * kTile) {
        const bf16* a0 = a + m0 * lda + k0;
        const bf16* b0 = b + (k0 / 2 * n + n0) * 2;
        _tile_loadd(4, a0, a_stride);
        _tile_loadd(5, a0 + kTile * lda, a_stride);
        _tile_loadd(6, b0, b_stride);
        _tile_loadd(7, b0 + 2 * kTile, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c00, c_stride);
      _tile_stored(1, c00 + kTile, c_stride);
      _tile_stored(2, c10, c_stride);
      _tile_stored(3, c10 + kTile, c_stride);
    }
}

// The 16 vectors of a 16x16 fp32 tile, transposed in registers: on return r[c] is column c.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
  }
}

// dst (w, rows) bf16 <- transpose of src (rows, w) (float or bf16); rows and w multiples of 16.
template <typename T>
void transpose_to_bf16(bf16* dst, const T* src, int64_t rows, int64_t w) {
  __m512 tile[16];
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t c0 = 0; c0 < w; c0 += 16) {
      for (int k = 0; k < 16; ++k) tile[k] = load16(src + (i0 + k) * w + c0);
      transpose16(tile);
      for (int k = 0; k < 16; ++k) store16(dst + (c0 + k) * rows + i0, tile[k]);
    }
}

inline void to_bf16(bf16* dst, const float* src, int64_t n) {  // n a multiple of 16
  for (int64_t i = 0; i < n; i += 16) store16(dst + i, load16(src + i));
}

// ---------------------------------------------------------------------------------------------
// Weights: bf16, packed once per call for the forward (x Wᵀ) and backward (g W) matmuls
// ---------------------------------------------------------------------------------------------

at::Tensor pack_matrix(const at::Tensor& matrix) {  // (k, n), any float dtype -> packed bf16
  const at::Tensor src = matrix.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty_like(src);
  pack_vnni(out.data_ptr<bf16>(), src.data_ptr<bf16>(), src.size(0), src.size(1));
  return out;
}

struct Layer {  // y = x Wᵀ + b for W (out, in)
  at::Tensor forward;   // Wᵀ (in, out), packed
  at::Tensor backward;  // W (out, in), packed: dL/dx = dL/dy W
  at::Tensor bias;  // (out,) fp32
  int64_t in, out;
};

Layer make_layer(const at::Tensor& weight, const at::Tensor& bias, bool with_backward) {
  TORCH_CHECK(weight.dim() == 2 && bias.dim() == 1 && bias.size(0) == weight.size(0),
              "aligner_blocks: a weight (out, in) and its bias (out,) expected, got ", weight.sizes(), " and ",
              bias.sizes());
  Layer layer;
  layer.forward = pack_matrix(weight.t());
  if (with_backward) layer.backward = pack_matrix(weight);
  layer.bias = bias.to(at::kFloat).contiguous();
  layer.out = weight.size(0);
  layer.in = weight.size(1);
  return layer;
}

struct Helpers {
  Layer nav1, nav2, gate, crit1, crit2;  // gate: (2d, d), transform rows first
  int64_t d, hn, hc, r;
};

Helpers make_helpers(const std::vector<at::Tensor>& w, bool with_backward) {
  TORCH_CHECK(w.size() == 10, "ct_helpers: 10 weight tensors expected, got ", w.size());
  Helpers h{make_layer(w[0], w[1], with_backward), make_layer(w[2], w[3], with_backward),
            make_layer(w[4], w[5], with_backward), make_layer(w[6], w[7], with_backward),
            make_layer(w[8], w[9], with_backward), 0, 0, 0, 0};
  h.d = h.nav1.in;
  h.hn = h.nav1.out;
  h.hc = h.crit1.out;
  h.r = h.nav2.out;
  TORCH_CHECK(h.nav2.in == h.hn && h.gate.in == h.d && h.gate.out == 2 * h.d && h.crit1.in == h.d &&
                  h.crit2.in == h.hc && h.crit2.out == h.r,
              "ct_helpers: inconsistent helper shapes (navigator ", h.d, "->", h.hn, "->", h.r, ", gate ",
              h.gate.in, "->", h.gate.out, ", critic ", h.crit1.in, "->", h.hc, "->", h.crit2.out, ")");
  TORCH_CHECK(widths_supported({h.d, h.hn, h.hc, h.r}), "ct_helpers: widths must be multiples of ", kWidthMultiple,
              ", got d=", h.d,
              " hidden=", h.hn, "/", h.hc, " out=", h.r);
  return h;
}

// C (m, layer.out) fp32 = A (m, layer.in) bf16 · Wᵀ.
inline void matmul_forward(float* c, const bf16* a, const Layer& layer, int64_t m) {
  gemm(c, layer.out, a, layer.in, m, layer.forward.data_ptr<bf16>(), layer.in, layer.out, false);
}
// C (m, layer.in) fp32 = G (m, layer.out) bf16 · W, or += when accumulate.
inline void matmul_backward(float* c, const bf16* g, const Layer& layer, int64_t m, bool accumulate) {
  gemm(c, layer.in, g, layer.out, m, layer.backward.data_ptr<bf16>(), layer.out, layer.in, accumulate);
}
// dW (out, in) += Gᵀ X over the m rows of a block: gt (out, m) bf16, x_packed the packed (m, in) rows.
inline void accumulate_weight_grad(float* dw, const bf16* gt, const bf16* x_packed, const Layer& layer, int64_t m) {
  gemm(dw, layer.in, gt, m, layer.out, x_packed, m, layer.in, true);
}

// ---------------------------------------------------------------------------------------------
// One block of rows
// ---------------------------------------------------------------------------------------------

// Per-thread buffers for one block of up to kBlockRows rows: x, the navigator's hidden layer (CT),
// the highway and the hidden layer after it (the CT critic's or the GAN discriminator's).
struct Block {
  int64_t m = 0;  // rows in the block, padded to a multiple of 32 (padding rows are zero inputs)
  std::vector<bf16> x, nav_hidden, highway, hidden;  // bf16 matmul inputs
  std::vector<float> transform, gate;                // fp32 highway state
  std::vector<float> acc_buffer;                     // (kBlockRows, max(hn, hc, 2d)) fp32 matmul outputs
  float* acc;                                        // acc_buffer.data()
  Block(int64_t d, int64_t nav_width, int64_t hidden_width)
      : x(kBlockRows * d), nav_hidden(kBlockRows * nav_width), highway(kBlockRows * d),
        hidden(kBlockRows * hidden_width), transform(kBlockRows * d), gate(kBlockRows * d),
        acc_buffer(kBlockRows * std::max({nav_width, hidden_width, 2 * d})), acc(acc_buffer.data()) {}
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  Block(Block&&) = default;  // moves acc_buffer's storage, so acc stays valid
};

// The highway of the CT critic and of the GAN discriminator on a block: transform and gate in one
// matmul, y = x + t ⊙ (relu(transform) - x) with t = σ(gate pre-activation); keeps transform and t.
void highway_forward(Block& b, const Layer& gate_layer, int64_t d) {
  const int64_t m = b.m;
  matmul_forward(b.acc, b.x.data(), gate_layer, m);
  const float* bias_t = gate_layer.bias.data_ptr<float>();
  const float* bias_g = bias_t + d;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < d; c += 16) {
      const float* a = b.acc + i * 2 * d;
      const __m512 tr = _mm512_add_ps(load16(a + c), load16(bias_t + c));
      const __m512 pre = _mm512_add_ps(load16(a + d + c), load16(bias_g + c));
      const __m512 t = reciprocal16(_mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), pre))));
      const __m512 x = load16(b.x.data() + i * d + c);
      store16(b.transform.data() + i * d + c, tr);
      store16(b.gate.data() + i * d + c, t);
      store16(b.highway.data() + i * d + c, _mm512_fmadd_ps(t, _mm512_sub_ps(_mm512_max_ps(tr, _mm512_setzero_ps()), x), x));
    }
  }
}

// (rows, w) fp32 + bias -> relu -> bf16 dst.
void bias_relu_to_bf16(bf16* dst, const float* src, const float* bias, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < w; c += 16)
      store16(dst + i * w + c, _mm512_max_ps(_mm512_add_ps(load16(src + i * w + c), load16(bias + c)), _mm512_setzero_ps()));
}

// (rows, w) fp32 + bias -> unit rows (bf16, first n_out rows written to out) and norms.
void bias_normalize(bf16* out, float* norms, float* src, const float* bias, int64_t n_out, int64_t w) {
  for (int64_t i = 0; i < n_out; ++i) {
    float* row = src + i * w;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t c = 0; c < w; c += 16) {
      const __m512 v = _mm512_add_ps(load16(row + c), load16(bias + c));
      store16(row + c, v);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const float norm = std::max(std::sqrt(_mm512_reduce_add_ps(squares)), kNormEps);
    const __m512 inverse = _mm512_set1_ps(1.0f / norm);
    for (int64_t c = 0; c < w; c += 16) store16(out + i * w + c, _mm512_mul_ps(load16(row + c), inverse));
    norms[i] = norm;
  }
}

// The block's forward pass: every activation into the block's buffers and, unless they are null,
// the two pre-normalisation outputs into `nav_pre` (m, r) and `crit_pre` (m, r) (the backward pass
// reads the stored unit outputs instead).
template <typename T>
void block_forward(Block& b, const Helpers& h, const StridedRows<const T>& rows, int64_t row0, int64_t n_valid,
                   float* nav_pre, float* crit_pre) {
  const int64_t m = b.m, d = h.d;
  load_rows(b.x.data(), rows, row0, n_valid, m, d);
  // Navigator.
  matmul_forward(b.acc, b.x.data(), h.nav1, m);
  bias_relu_to_bf16(b.nav_hidden.data(), b.acc, h.nav1.bias.data_ptr<float>(), m, h.hn);
  if (nav_pre != nullptr) matmul_forward(nav_pre, b.nav_hidden.data(), h.nav2, m);
  // Critic: highway, then Linear-ReLU-Linear.
  highway_forward(b, h.gate, d);
  matmul_forward(b.acc, b.highway.data(), h.crit1, m);
  bias_relu_to_bf16(b.hidden.data(), b.acc, h.crit1.bias.data_ptr<float>(), m, h.hc);
  if (crit_pre != nullptr) matmul_forward(crit_pre, b.hidden.data(), h.crit2, m);
}

// Backward of normalize(y) with y = pre + bias: dL/dy (rows, w) from dL/d(unit) times sign, fp32
// into grad_out and bf16 into rows_bf16, its column sums added into sums (the bias gradient); rows
// beyond n_valid get 0. `unit` is the stored output, `norms` its norms.
void normalize_backward(float* grad_out, const bf16* grad_in, float sign, const bf16* unit, const float* norms,
                        int64_t n_valid, int64_t rows, int64_t w, float* sums, bf16* rows_bf16) {
  const __m512 s = _mm512_set1_ps(sign);
  for (int64_t i = 0; i < n_valid; ++i) {
    __m512 along = _mm512_setzero_ps();
    for (int64_t c = 0; c < w; c += 16)
      along = _mm512_fmadd_ps(load16(unit + i * w + c), _mm512_mul_ps(s, load16(grad_in + i * w + c)), along);
    const float dot = norms[i] <= kNormEps ? 0.0f : _mm512_reduce_add_ps(along);  // clamped norm: linear
    const __m512 a = _mm512_set1_ps(dot), inverse = _mm512_set1_ps(1.0f / norms[i]);
    for (int64_t c = 0; c < w; c += 16) {
      const __m512 g = _mm512_mul_ps(s, load16(grad_in + i * w + c));
      const __m512 out = _mm512_mul_ps(_mm512_fnmadd_ps(load16(unit + i * w + c), a, g), inverse);
      store16(grad_out + i * w + c, out);
      store16(rows_bf16 + i * w + c, out);
      store16(sums + c, _mm512_add_ps(load16(sums + c), out));
    }
  }
  std::fill(grad_out + n_valid * w, grad_out + rows * w, 0.0f);
  std::fill(rows_bf16 + n_valid * w, rows_bf16 + rows * w, bf16(0.0f));
}
// Per-group sums of the weight and bias gradients (fp32), one flat buffer per group. The first
// layers' weight gradients (navigator's first layer, highway gate) are summed transposed, (in, out):
// their matmul reads the block's x transposed, which it shares.
struct GradSlots {
  struct Slot {
    int64_t rows, cols;  // a weight (rows, cols) as returned, or a bias (rows, 0)
    bool transposed;     // summed as (cols, rows)
  };
  std::vector<Slot> slots;
  std::vector<int64_t> offsets;
  int64_t size = 0;
  explicit GradSlots(std::vector<Slot> list) : slots(std::move(list)) {
    for (const Slot& slot : slots) {
      offsets.push_back(size);
      size += slot.rows * std::max<int64_t>(slot.cols, 1);
    }
    offsets.push_back(size);
  }
  float* at(float* group, size_t i) const { return group + offsets[i]; }

  // The groups' sums, added in group order (thread-count independent), as tensors.
  std::vector<at::Tensor> reduce(const std::vector<float>& partial, int64_t groups, const at::TensorOptions& options) const {
    std::vector<at::Tensor> out;
    for (size_t i = 0; i < slots.size(); ++i) {
      const int64_t n = offsets[i + 1] - offsets[i];
      at::Tensor g = at::zeros({n}, options.dtype(at::kFloat));
      float* dst = g.data_ptr<float>();
      for (int64_t group = 0; group < groups; ++group) {
        const float* src = partial.data() + group * size + offsets[i];
        for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
      }
      const Slot& slot = slots[i];
      if (slot.cols == 0)
        out.push_back(g);
      else if (slot.transposed)
        out.push_back(g.view({slot.cols, slot.rows}).t().contiguous());
      else
        out.push_back(g.view({slot.rows, slot.cols}));
    }
    return out;
  }
};

GradSlots ct_slots(const Helpers& h) {  // the order of ct_helpers' weights
  return GradSlots({{h.hn, h.d, true}, {h.hn, 0, false}, {h.r, h.hn, false}, {h.r, 0, false},
                    {2 * h.d, h.d, true}, {2 * h.d, 0, false}, {h.hc, h.d, false}, {h.hc, 0, false},
                    {h.r, h.hc, false}, {h.r, 0, false}});
}

// Scratch of the backward pass beyond the forward's.
struct BackwardScratch {
  std::vector<float> grad_a, grad_b, grad_x;  // fp32 gradients of the block's activations (m, ·)
  std::vector<bf16> grad_bf16, grad_t, x_t;   // a gradient as matmul input (m, ·) and transposed; xᵀ (d, m)
  std::vector<bf16> packed;                   // a (m, ·) matrix packed as a weight gradient's B operand
  BackwardScratch(int64_t d, int64_t widest)
      : grad_a(kBlockRows * widest), grad_b(kBlockRows * widest), grad_x(kBlockRows * d),
        grad_bf16(kBlockRows * widest), grad_t(kBlockRows * widest), x_t(kBlockRows * d),
        packed(kBlockRows * widest) {}
};

// One pass over a block's fp32 gradient g (rows, w), rows even: optionally the ReLU backward first
// (g <- g ⊙ [relu_out > 0], written back), then its column sums added into `sums` (a bias gradient)
// and its bf16 forms as matmul operands: row-major (`rows_out`) and packed by row pairs as a B
// operand (`vnni_out`), each when not null.
void gradient_pass(float* __restrict__ g, int64_t rows, int64_t w, const bf16* __restrict__ relu_out,
                   float* __restrict__ sums, bf16* __restrict__ rows_out, bf16* __restrict__ vnni_out) {
  auto* vnni = reinterpret_cast<uint32_t*>(vnni_out);
  for (int64_t c = 0; c < w; c += 16) {
    __m512 sum = load16(sums + c);
    for (int64_t i = 0; i < rows; i += 2) {
      const int64_t o = i * w + c;
      __m512 even = load16(g + o), odd = load16(g + o + w);
      if (relu_out != nullptr) {
        even = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load16(relu_out + o), _mm512_setzero_ps(), _CMP_GT_OQ), even);
        odd = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load16(relu_out + o + w), _mm512_setzero_ps(), _CMP_GT_OQ), odd);
        store16(g + o, even);
        store16(g + o + w, odd);
      }
      sum = _mm512_add_ps(sum, _mm512_add_ps(even, odd));
      const __m256i even_bf16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(even));
      const __m256i odd_bf16 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(odd));
      if (rows_out != nullptr) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows_out + o), even_bf16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows_out + o + w), odd_bf16);
      }
      if (vnni != nullptr) {
        _mm512_storeu_si512(vnni + (i / 2) * w + c, interleave(even_bf16, odd_bf16));
      }
    }
    store16(sums + c, sum);
  }
}

// Backward of highway_forward from dL/dy (m, d) fp32: adds dL/dx into s.grad_x and the gate's weight
// (transposed, (d, 2d)) and bias gradients into their sums; s.x_t must hold xᵀ.
// y = x + t (relu(tr) - x): dtr = g t [tr > 0], dpre = g (relu(tr) - x) t (1 - t), direct path
// dx += g (1 - t); [dtr | dpre] (m, 2d) feeds the gate matmul's gradients.
void highway_backward(Block& b, BackwardScratch& s, const Layer& gate_layer, int64_t d, const float* grad_y,
                      float* grad_w_t, float* grad_bias) {
  const int64_t m = b.m, w = 2 * d;
  bf16* __restrict__ rows_out = s.grad_bf16.data();  // [dtr | dpre] (m, 2d), the dx matmul's A operand
  auto* __restrict__ pairs = reinterpret_cast<uint32_t*>(s.packed.data());  // the same, packed by row pairs
  float* __restrict__ grad_x = s.grad_x.data();
  const float* __restrict__ gate = b.gate.data();
  const float* __restrict__ transform = b.transform.data();
  const bf16* __restrict__ x = b.x.data();
  for (int64_t c = 0; c < d; c += 16) {
    __m512 sum_tr = load16(grad_bias + c), sum_pre = load16(grad_bias + d + c);
    for (int64_t i = 0; i < m; i += 2) {
      __m256i tr_bf16[2], pre_bf16[2];
      for (int64_t r = 0; r < 2; ++r) {
        const int64_t o = (i + r) * d + c;
        const __m512 g = load16(grad_y + o), t = load16(gate + o), tr = load16(transform + o), xv = load16(x + o);
        const __m512 one_minus_t = _mm512_sub_ps(_mm512_set1_ps(1.0f), t);
        const __m512 relu_tr = _mm512_max_ps(tr, _mm512_setzero_ps());
        const __mmask16 active = _mm512_cmp_ps_mask(tr, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 d_tr = _mm512_maskz_mov_ps(active, _mm512_mul_ps(g, t));
        const __m512 d_pre = _mm512_mul_ps(_mm512_mul_ps(g, _mm512_sub_ps(relu_tr, xv)), _mm512_mul_ps(t, one_minus_t));
        store16(grad_x + o, _mm512_fmadd_ps(g, one_minus_t, load16(grad_x + o)));
        sum_tr = _mm512_add_ps(sum_tr, d_tr);
        sum_pre = _mm512_add_ps(sum_pre, d_pre);
        tr_bf16[r] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(d_tr));
        pre_bf16[r] = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(d_pre));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows_out + (i + r) * w + c), tr_bf16[r]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows_out + (i + r) * w + d + c), pre_bf16[r]);
      }
      _mm512_storeu_si512(pairs + (i / 2) * w + c, interleave(tr_bf16[0], tr_bf16[1]));
      _mm512_storeu_si512(pairs + (i / 2) * w + d + c, interleave(pre_bf16[0], pre_bf16[1]));
    }
    store16(grad_bias + c, sum_tr);
    store16(grad_bias + d + c, sum_pre);
  }
  gemm(grad_w_t, w, s.x_t.data(), m, d, s.packed.data(), m, w, true);  // (d, 2d)
  matmul_backward(grad_x, rows_out, gate_layer, m, true);
}

// Writes a block's row gradients s.grad_x times `sign` (the GAN's gradient reversal: -1).
template <typename T>
void store_row_gradients(const BackwardScratch& s, const StridedRows<T>& grad_rows, int64_t row0, int64_t n_valid,
                         int64_t d, float sign) {
  const __m512 scale = _mm512_set1_ps(sign);
  for (int64_t i = 0; i < n_valid; ++i) {
    T* out = grad_rows.row(row0 + i);
    for (int64_t c = 0; c < d; c += 16) store16(out + c, _mm512_mul_ps(scale, load16(s.grad_x.data() + i * d + c)));
  }
}

// One block's backward pass. The weight gradients contract over the block's rows; the matmul takes
// that contraction as A (out, m) · B (m, in) with B packed by row pairs, so one of the two factors
// is transposed: the narrower (gradients of the 32-wide outputs, the critic's hidden gradient) or
// the shared one (x, for the navigator's first layer and the gate, whose gradients come out
// transposed).
// This part starts from the block's activations (b, as block_forward leaves them) and leaves dL/dx
// in s.grad_x.
void block_backward_from_activations(Block& b, BackwardScratch& s, const Helpers& h, int64_t n_valid,
                                     const bf16* grad_nav, const bf16* grad_crit, float crit_sign, const bf16* nav,
                                     const float* nav_norm, const bf16* crit, const float* crit_norm, float* grads,
                                     const GradSlots& slots) {
  const int64_t m = b.m, d = h.d;
  transpose_to_bf16(s.x_t.data(), b.x.data(), m, d);
  float* g_nav_w1_t = slots.at(grads, 0);  // (d, hn)
  float* g_nav_b1 = slots.at(grads, 1);
  float* g_nav_w2 = slots.at(grads, 2);
  float* g_nav_b2 = slots.at(grads, 3);
  float* g_gate_w_t = slots.at(grads, 4);  // (d, 2d)
  float* g_gate_b = slots.at(grads, 5);
  float* g_crit_w1 = slots.at(grads, 6);
  float* g_crit_b1 = slots.at(grads, 7);
  float* g_crit_w2 = slots.at(grads, 8);
  float* g_crit_b2 = slots.at(grads, 9);
  float* grad_a = s.grad_a.data();
  float* grad_b = s.grad_b.data();
  float* grad_x = s.grad_x.data();

  // Navigator: normalisation, second linear layer, ReLU, first linear layer.
  normalize_backward(grad_a, grad_nav, 1.0f, nav, nav_norm, n_valid, m, h.r, g_nav_b2, s.grad_bf16.data());
  transpose_to_bf16(s.grad_t.data(), grad_a, m, h.r);
  pack_vnni(s.packed.data(), b.nav_hidden.data(), m, h.hn);
  gemm(g_nav_w2, h.hn, s.grad_t.data(), m, h.r, s.packed.data(), m, h.hn, true);  // (r, hn)
  matmul_backward(grad_b, s.grad_bf16.data(), h.nav2, m, false);  // (m, hn)
  gradient_pass(grad_b, m, h.hn, b.nav_hidden.data(), g_nav_b1, s.grad_bf16.data(), s.packed.data());
  gemm(g_nav_w1_t, h.hn, s.x_t.data(), m, d, s.packed.data(), m, h.hn, true);  // (d, hn)
  matmul_backward(grad_x, s.grad_bf16.data(), h.nav1, m, false);  // dL/dx, navigator part (m, d)

  // Critic: normalisation (the cost is 1 - g·g: crit_sign -1), Linear-ReLU-Linear.
  normalize_backward(grad_a, grad_crit, crit_sign, crit, crit_norm, n_valid, m, h.r, g_crit_b2, s.grad_bf16.data());
  transpose_to_bf16(s.grad_t.data(), grad_a, m, h.r);
  pack_vnni(s.packed.data(), b.hidden.data(), m, h.hc);
  gemm(g_crit_w2, h.hc, s.grad_t.data(), m, h.r, s.packed.data(), m, h.hc, true);  // (r, hc)
  matmul_backward(grad_b, s.grad_bf16.data(), h.crit2, m, false);  // (m, hc)
  gradient_pass(grad_b, m, h.hc, b.hidden.data(), g_crit_b1, s.grad_bf16.data(), nullptr);
  transpose_to_bf16(s.grad_t.data(), grad_b, m, h.hc);
  pack_vnni(s.packed.data(), b.highway.data(), m, d);
  gemm(g_crit_w1, d, s.grad_t.data(), m, h.hc, s.packed.data(), m, d, true);  // (hc, d)
  matmul_backward(grad_a, s.grad_bf16.data(), h.crit1, m, false);  // dL/d highway (m, d)

  highway_backward(b, s, h.gate, d, grad_a, g_gate_w_t, g_gate_b);
}

template <typename T>
void block_backward(Block& b, BackwardScratch& s, const Helpers& h, const StridedRows<const T>& rows, int64_t row0,
                    int64_t n_valid,
                    const bf16* grad_nav, const bf16* grad_crit, float crit_sign, const bf16* nav, const float* nav_norm,
                    const bf16* crit, const float* crit_norm, float* grads, const GradSlots& slots,
                    const StridedRows<T>& grad_rows) {
  block_forward(b, h, rows, row0, n_valid, static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  block_backward_from_activations(b, s, h, n_valid, grad_nav, grad_crit, crit_sign, nav, nav_norm, crit, crit_norm,
                                  grads, slots);
  store_row_gradients(s, grad_rows, row0, n_valid, h.d, 1.0f);
}

// The two sides' rows as one sequence of blocks: side 0 (queries) then side 1 (keys).
struct Sides {
  int64_t rows[2], blocks[2];
  Sides(int64_t query_rows, int64_t key_rows) {
    rows[0] = query_rows;
    rows[1] = key_rows;
    for (int s = 0; s < 2; ++s) blocks[s] = (rows[s] + kBlockRows - 1) / kBlockRows;
  }
  int64_t total() const { return blocks[0] + blocks[1]; }
  // block index -> (side, first row within the side, rows)
  std::tuple<int, int64_t, int64_t> locate(int64_t block) const {
    const int side = block < blocks[0] ? 0 : 1;
    const int64_t first = (side == 0 ? block : block - blocks[0]) * kBlockRows;
    return {side, first, std::min(kBlockRows, rows[side] - first)};
  }
};

int64_t padded(int64_t n) { return (n + kWidthMultiple - 1) / kWidthMultiple * kWidthMultiple; }

void check_side(const at::Tensor& t, const char* name, int64_t d) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.size(3) == d && t.stride(3) == 1 &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              "aligner_blocks: ", name, " must be a float32 or bfloat16 (B, H, N, ", d,
              ") CPU tensor with unit stride in its last dimension, got ", t.sizes(), " strides ", t.strides(), " ",
              t.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// GAN discriminator: highway, Linear-LeakyReLU, Linear to one logit, per block of rows
// ---------------------------------------------------------------------------------------------

struct Discriminator {
  Layer gate, hidden;    // highway gate (2d, d), transform rows first; hidden layer (h, d)
  at::Tensor out_weight;  // (h,) fp32
  float out_bias, slope;
  int64_t d, h;
};

Discriminator make_discriminator(const std::vector<at::Tensor>& w, double slope, bool with_backward) {
  TORCH_CHECK(w.size() == 6, "gan_discriminator: 6 weight tensors expected, got ", w.size());
  Discriminator D{make_layer(w[0], w[1], with_backward), make_layer(w[2], w[3], with_backward),
                  w[4].to(at::kFloat).contiguous().view({-1}), 0.0f, static_cast<float>(slope), 0, 0};
  D.d = D.gate.in;
  D.h = D.hidden.out;
  TORCH_CHECK(D.gate.out == 2 * D.d && D.hidden.in == D.d && w[4].numel() == D.h && w[5].numel() == 1,
              "gan_discriminator: inconsistent shapes (gate ", D.gate.in, "->", D.gate.out, ", hidden ", D.hidden.in,
              "->", D.h, ", output ", w[4].sizes(), " + ", w[5].sizes(), ")");
  TORCH_CHECK(widths_supported({D.d, D.h}),
              "gan_discriminator: widths must be multiples of ", kWidthMultiple, ", got d=", D.d, " hidden=", D.h);
  D.out_bias = w[5].to(at::kFloat).item<float>();
  return D;
}

// A block's forward pass; leaves the hidden layer's activations fp32 in b.acc (m, h) and bf16 in
// b.hidden, and writes the first n_valid logits.
template <typename T>
void gan_block_forward(Block& b, const Discriminator& D, const StridedRows<const T>& rows, int64_t row0,
                       int64_t n_valid, float* logits) {
  const int64_t m = b.m, h = D.h;
  load_rows(b.x.data(), rows, row0, n_valid, m, D.d);
  highway_forward(b, D.gate, D.d);
  matmul_forward(b.acc, b.highway.data(), D.hidden, m);
  const float* bias = D.hidden.bias.data_ptr<float>();
  const float* out_w = D.out_weight.data_ptr<float>();
  const __m512 slope = _mm512_set1_ps(D.slope);
  for (int64_t i = 0; i < m; ++i) {
    __m512 dot = _mm512_setzero_ps();
    for (int64_t c = 0; c < h; c += 16) {
      float* a = b.acc + i * h + c;
      const __m512 pre = _mm512_add_ps(load16(a), load16(bias + c));
      const __mmask16 negative = _mm512_cmp_ps_mask(pre, _mm512_setzero_ps(), _CMP_LE_OQ);
      const __m512 act = _mm512_mask_mul_ps(pre, negative, pre, slope);  // leaky ReLU
      store16(a, act);
      store16(b.hidden.data() + i * h + c, act);
      dot = _mm512_fmadd_ps(act, load16(out_w + c), dot);
    }
    if (i < n_valid) logits[i] = _mm512_reduce_add_ps(dot) + D.out_bias;
  }
}

GradSlots gan_slots(const Discriminator& D) {  // the order of the discriminator's weights
  return GradSlots({{2 * D.d, D.d, true}, {2 * D.d, 0, false}, {D.h, D.d, false}, {D.h, 0, false},
                    {1, D.h, false}, {1, 0, false}});
}

template <typename T>
void gan_block_backward(Block& b, BackwardScratch& s, const Discriminator& D, const StridedRows<const T>& rows,
                        int64_t row0, int64_t n_valid, const float* grad_logits, float* grads,
                        const GradSlots& slots, const StridedRows<T>& grad_rows, float input_sign) {
  const int64_t m = b.m, d = D.d, h = D.h;
  std::vector<float>& logits = s.grad_x;  // scratch for the recomputed logits (overwritten below)
  gan_block_forward(b, D, rows, row0, n_valid, logits.data());
  transpose_to_bf16(s.x_t.data(), b.x.data(), m, d);
  float *g_gate_w_t = slots.at(grads, 0), *g_gate_b = slots.at(grads, 1), *g_w1 = slots.at(grads, 2),
        *g_b1 = slots.at(grads, 3), *g_w2 = slots.at(grads, 4), *g_b2 = slots.at(grads, 5);

  // Output layer: dW2 += Σ g_i a_i, db2 += Σ g_i; dL/d(hidden pre-activation) = g_i w2 ⊙ leaky'(a).
  float* grad_pre = s.grad_b.data();  // (m, h)
  const float* out_w = D.out_weight.data_ptr<float>();
  const __m512 slope = _mm512_set1_ps(D.slope);
  float bias_sum = 0.0f;
  for (int64_t i = 0; i < m; ++i) {
    const float gi = i < n_valid ? grad_logits[i] : 0.0f;
    bias_sum += gi;
    const __m512 g = _mm512_set1_ps(gi);
    for (int64_t c = 0; c < h; c += 16) {
      const __m512 act = load16(b.acc + i * h + c);
      store16(g_w2 + c, _mm512_fmadd_ps(g, act, load16(g_w2 + c)));
      const __mmask16 negative = _mm512_cmp_ps_mask(act, _mm512_setzero_ps(), _CMP_LE_OQ);
      const __m512 grad = _mm512_mul_ps(g, load16(out_w + c));
      store16(grad_pre + i * h + c, _mm512_mask_mul_ps(grad, negative, grad, slope));
    }
  }
  *g_b2 += bias_sum;
  gradient_pass(grad_pre, m, h, nullptr, g_b1, s.grad_bf16.data(), nullptr);
  transpose_to_bf16(s.grad_t.data(), grad_pre, m, h);
  pack_vnni(s.packed.data(), b.highway.data(), m, d);
  gemm(g_w1, d, s.grad_t.data(), m, h, s.packed.data(), m, d, true);  // (h, d)
  matmul_backward(s.grad_a.data(), s.grad_bf16.data(), D.hidden, m, false);  // dL/d highway (m, d)
  std::fill(s.grad_x.begin(), s.grad_x.begin() + m * d, 0.0f);
  highway_backward(b, s, D.gate, d, s.grad_a.data(), g_gate_w_t, g_gate_b);
  store_row_gradients(s, grad_rows, row0, n_valid, d, input_sign);
}

// The checks every op makes of its rows, and the rows' block layout.
Sides checked_sides(const char* op, const at::Tensor& queries, const at::Tensor& keys, int64_t d) {
  TORCH_CHECK(amx_permitted(), op, ": the kernel did not grant this process the AMX tile state");
  check_side(queries, "queries", d);
  check_side(keys, "keys", d);
  TORCH_CHECK(queries.scalar_type() == keys.scalar_type(), op, ": queries and keys differ in dtype");
  return Sides(queries.numel() / d, keys.numel() / d);
}

// A dense gradient for rows t (B, H, N, d) with t's order of dimensions in memory: the attention's
// q and k are (B, N, H·d) projections (or column chunks of a fused one) seen as (B, H, N, d), and
// their gradients, laid out (B, N, H, d), are read by autograd's view and chunk backward in order.
at::Tensor gradient_like(const at::Tensor& t) {
  if (t.stride(1) < t.stride(2))
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  return at::empty(t.sizes(), t.options());
}

std::pair<at::Tensor, at::Tensor> row_gradients(const at::Tensor& queries, const at::Tensor& keys) {
  return {gradient_like(queries), gradient_like(keys)};
}

// Calls fn(T{}) with T the rows' element type (float or bf16; check_side allows no other).
template <typename Fn>
void dispatch_rows(const at::Tensor& rows, Fn&& fn) {
  if (rows.scalar_type() == at::kFloat)
    fn(float{});
  else
    fn(bf16{});
}

// Calls fn(data, grads): the rows of queries and keys (data[0], data[1]) and of their gradients,
// typed by the rows' element type.
template <typename Fn>
void dispatch_sides(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& grad_q,
                    const at::Tensor& grad_k, Fn&& fn) {
  dispatch_rows(queries, [&](auto tag) {
    using T = decltype(tag);
    const StridedRows<const T> data[2] = {strided_rows<const T>(queries), strided_rows<const T>(keys)};
    const StridedRows<T> grads[2] = {strided_rows<T>(grad_q), strided_rows<T>(grad_k)};
    fn(data, grads);
  });
}

// Runs fn(scratch, i) for i in [0, n) in parallel. Each thread configures its AMX tiles and builds
// its scratch = make_scratch() once, for all the items it runs.
template <typename Make, typename Fn>
void parallel_with_tiles(int64_t n, Make&& make_scratch, Fn&& fn) {
  at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
    configure_tiles();
    auto scratch = make_scratch();
    for (int64_t i = first; i < last; ++i) fn(scratch, i);
    _tile_release();
  });
}

// Weight and bias gradients summed per fixed group of work units (blocks): each group is
// summed by one thread in unit order, then the groups in order, so the result does not depend on
// the thread count.
struct GroupSums {
  const GradSlots& slots;
  int64_t units, groups;
  std::vector<float> partial;  // (groups, slots.size)
  GroupSums(const GradSlots& slot_list, int64_t unit_count)
      : slots(slot_list), units(unit_count), groups(std::min(kMaxGroups, std::max<int64_t>(1, unit_count))),
        partial(static_cast<size_t>(groups * slot_list.size), 0.0f) {}
  float* of(int64_t group) { return partial.data() + group * slots.size; }
  int64_t first_unit(int64_t group) const { return group * units / groups; }  // group's units: [first, first of next)
  // Appends the summed gradients, as tensors in the slots' order, to out.
  void append_to(std::vector<at::Tensor>& out, const at::TensorOptions& options) const {
    for (at::Tensor& g : slots.reduce(partial, groups, options)) out.push_back(std::move(g));
  }
};

#endif  // VQA_ALIGN_ALIGNER_BLOCKS

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

// Whether the kernels run here, for helper networks of these widths (all multiples of 32).
bool helper_blocks_supported(c10::List<int64_t> widths) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  return widths_supported(widths.vec()) && amx_permitted();
#else
  (void)widths;
  return false;
#endif
}

#ifdef VQA_ALIGN_ALIGNER_BLOCKS

template <typename T>
void forward_blocks(const Helpers& h, const Sides& sides, const StridedRows<const T> side_data[2], bf16* nav,
                    float* nav_norm, bf16* crit, float* crit_norm) {
  struct Scratch {
    Block b;
    std::vector<float> nav_pre, crit_pre;  // (kBlockRows, r) pre-normalisation outputs
  };
  parallel_with_tiles(
      sides.total(),
      [&] { return Scratch{Block(h.d, h.hn, h.hc), std::vector<float>(kBlockRows * h.r), std::vector<float>(kBlockRows * h.r)}; },
      [&](Scratch& x, int64_t block) {
        const auto [side, row0, n] = sides.locate(block);
        const int64_t out_row = (side == 0 ? 0 : sides.rows[0]) + row0;
        x.b.m = padded(n);
        block_forward(x.b, h, side_data[side], row0, n, x.nav_pre.data(), x.crit_pre.data());
        bias_normalize(nav + out_row * h.r, nav_norm + out_row, x.nav_pre.data(), h.nav2.bias.data_ptr<float>(), n,
                       h.r);
        bias_normalize(crit + out_row * h.r, crit_norm + out_row, x.crit_pre.data(), h.crit2.bias.data_ptr<float>(),
                       n, h.r);
      });
}

struct BackwardInputs {
  const bf16 *grad_nav, *grad_crit, *nav, *crit;
  const float *nav_norm, *crit_norm;
  float crit_sign;
};

// The block backward scratch of one thread.
struct BlockBackwardScratch {
  Block b;
  BackwardScratch s;
};

template <typename T>
void backward_blocks(const Helpers& h, const Sides& sides, const StridedRows<const T> side_data[2],
                     const StridedRows<T> side_grad[2], const BackwardInputs& in, GroupSums& sums) {
  parallel_with_tiles(
      sums.groups,
      [&] { return BlockBackwardScratch{Block(h.d, h.hn, h.hc), BackwardScratch(h.d, std::max({h.hn, h.hc, 2 * h.d, h.r}))}; },
      [&](BlockBackwardScratch& x, int64_t group) {
        for (int64_t block = sums.first_unit(group); block < sums.first_unit(group + 1); ++block) {
          const auto [side, row0, n] = sides.locate(block);
          const int64_t at_row = (side == 0 ? 0 : sides.rows[0]) + row0;
          x.b.m = padded(n);
          block_backward(x.b, x.s, h, side_data[side], row0, n, in.grad_nav + at_row * h.r,
                         in.grad_crit + at_row * h.r, in.crit_sign, in.nav + at_row * h.r, in.nav_norm + at_row,
                         in.crit + at_row * h.r, in.crit_norm + at_row, sums.of(group), sums.slots, side_grad[side]);
        }
      });
}

// ---------------------------------------------------------------------------------------------
// Transport, one (sample, head) at a time: S = f(q)·f(k) and g(q)·g(k) as (Nq, Nk) matrices that
// stay in the cache (the layer-by-layer path writes E and C to memory and reads them back).
// ---------------------------------------------------------------------------------------------

// dst (w, rows) <- transpose of src (rows, w) for 32-bit elements; rows and w multiples of 16.
void transpose_words(uint32_t* dst, const uint32_t* src, int64_t rows, int64_t w) {
  __m512 tile[16];
  for (int64_t i0 = 0; i0 < rows; i0 += 16)
    for (int64_t c0 = 0; c0 < w; c0 += 16) {
      for (int k = 0; k < 16; ++k) tile[k] = _mm512_castsi512_ps(_mm512_loadu_si512(src + (i0 + k) * w + c0));
      transpose16(tile);
      for (int k = 0; k < 16; ++k) _mm512_storeu_si512(dst + (c0 + k) * rows + i0, _mm512_castps_si512(tile[k]));
    }
}

struct TransportShape {
  int64_t batch, heads, nq, nk, r, nq_pad, nk_pad, query_rows;  // query_rows = B·H·Nq: first key row
  TransportShape(int64_t b, int64_t h, int64_t q, int64_t k, int64_t width)
      : batch(b), heads(h), nq(q), nk(k), r(width), nq_pad(padded(q)), nk_pad(padded(k)), query_rows(b * h * q) {}
};

// One (sample, head): the unit vectors of both helpers for its queries and keys, padded with zero
// rows, and the transport matrices.
struct TransportScratch {
  std::vector<bf16> fq, gq, fk, gk;          // (n_pad, r) rows, zero-padded
  std::vector<bf16> fk_t, gk_t;              // B operands f(k)ᵀ, g(k)ᵀ (r, nk_pad), VNNI
  std::vector<float> s, c;                   // S = f(q) f(k)ᵀ, g(q) g(k)ᵀ (nq_pad, nk_pad)
  std::vector<float> k_mask;                 // (nk_pad,) 1 on valid keys
  std::vector<float> col_sum, col_cost;      // (nk_pad,)
  std::vector<float> beta, b;                // (nk_pad,) backward coefficients
  std::vector<bf16> ds, plan;                // dS and P (nq_pad, nk_pad), zero-padded
  std::vector<bf16> packed;                  // VNNI of a B operand
  std::vector<bf16> units_t;                 // f(q)ᵀ or g(q)ᵀ (r, nq_pad)
  std::vector<float> out;                    // a product, (nq_pad, r) or (r, nk_pad)
  std::vector<bf16> out_rows;                // a key-side product as rows (nk_pad, r)
  explicit TransportScratch(const TransportShape& t) {
    const int64_t n_max = std::max(t.nq_pad, t.nk_pad), matrix = t.nq_pad * t.nk_pad;
    for (auto* v : {&fq, &gq}) v->assign(t.nq_pad * t.r, bf16(0.0f));
    for (auto* v : {&fk, &gk}) v->assign(t.nk_pad * t.r, bf16(0.0f));
    for (auto* v : {&fk_t, &gk_t}) v->resize(t.nk_pad * t.r);
    for (auto* v : {&s, &c}) v->resize(matrix);
    for (auto* v : {&k_mask, &col_sum, &col_cost, &beta, &b}) v->assign(t.nk_pad, 0.0f);
    for (auto* v : {&ds, &plan}) v->assign(matrix, bf16(0.0f));
    packed.resize(std::max(n_max * t.r, matrix));
    units_t.resize(t.nq_pad * t.r);
    out.resize(n_max * t.r);
    out_rows.resize(t.nk_pad * t.r);
  }
};

// Loads one (sample, head)'s unit vectors (fq, gq: its nq query rows; fk, gk: its nk key rows) and
// its sample's key mask kv (nk,), and computes S and g(q)·g(k) into the scratch.
void transport_matrices(TransportScratch& x, const TransportShape& t, const bf16* fq, const bf16* gq, const bf16* fk,
                        const bf16* gk, const bool* kv) {
  const int64_t r = t.r;
  std::copy(fq, fq + t.nq * r, x.fq.begin());
  std::copy(gq, gq + t.nq * r, x.gq.begin());
  std::copy(fk, fk + t.nk * r, x.fk.begin());
  std::copy(gk, gk + t.nk * r, x.gk.begin());
  // B = f(k)ᵀ in VNNI: its pairs of rows are pairs of columns of f(k), i.e. f(k)'s 32-bit words, transposed.
  transpose_words(reinterpret_cast<uint32_t*>(x.fk_t.data()), reinterpret_cast<const uint32_t*>(x.fk.data()),
                  t.nk_pad, r / 2);
  transpose_words(reinterpret_cast<uint32_t*>(x.gk_t.data()), reinterpret_cast<const uint32_t*>(x.gk.data()),
                  t.nk_pad, r / 2);
  gemm(x.s.data(), t.nk_pad, x.fq.data(), r, t.nq_pad, x.fk_t.data(), r, t.nk_pad, false);
  gemm(x.c.data(), t.nk_pad, x.gq.data(), r, t.nq_pad, x.gk_t.data(), r, t.nk_pad, false);
  for (int64_t j = 0; j < t.nk; ++j) x.k_mask[j] = kv[j] ? 1.0f : 0.0f;
}

// Columns [0, nk) in vectors of 16; the last vector's lanes beyond nk are masked by k_mask (zero).
inline int64_t key_vectors(const TransportShape& t) { return (t.nk + 15) / 16; }

// One (sample, head)'s sums (row_sum, row_cost (nq,); col_sum, col_cost (nk,)); qv: its sample's query
// mask.
void transport_forward_one(TransportScratch& x, const TransportShape& t, const bool* qv, float* row_sum,
                           float* col_sum, float* row_cost, float* col_cost) {
  std::fill(x.col_sum.begin(), x.col_sum.end(), 0.0f);
  std::fill(x.col_cost.begin(), x.col_cost.end(), 0.0f);
  for (int64_t i = 0; i < t.nq; ++i) {
    float rs = 0.0f, rc = 0.0f;
    if (qv[i]) {
      __m512 sum = _mm512_setzero_ps(), cost_sum = _mm512_setzero_ps();
      for (int64_t v = 0; v < key_vectors(t); ++v) {
        const int64_t o = i * t.nk_pad + 16 * v;
        const __m512 e = _mm512_mul_ps(exp16(load16(x.s.data() + o)), load16(x.k_mask.data() + 16 * v));
        const __m512 ec = _mm512_mul_ps(e, _mm512_sub_ps(_mm512_set1_ps(1.0f), load16(x.c.data() + o)));
        sum = _mm512_add_ps(sum, e);
        cost_sum = _mm512_add_ps(cost_sum, ec);
        store16(x.col_sum.data() + 16 * v, _mm512_add_ps(load16(x.col_sum.data() + 16 * v), e));
        store16(x.col_cost.data() + 16 * v, _mm512_add_ps(load16(x.col_cost.data() + 16 * v), ec));
      }
      rs = _mm512_reduce_add_ps(sum);
      rc = _mm512_reduce_add_ps(cost_sum);
    }
    row_sum[i] = rs;
    row_cost[i] = rc;
  }
  std::copy(x.col_sum.begin(), x.col_sum.begin() + t.nk, col_sum);
  std::copy(x.col_cost.begin(), x.col_cost.begin() + t.nk, col_cost);
}

// One (sample, head)'s backward from its coefficients α, a (nq,) and β, b (nk,): dL/df and dL/d(g·g)
// products into the query rows (nav_q, crit_q: (nq, r)) and key rows (nav_k, crit_k: (nk, r)).
void transport_backward_one(TransportScratch& x, const TransportShape& t, const bool* qv, const float* alpha,
                            const float* beta, const float* a, const float* b, bf16* nav_q, bf16* crit_q, bf16* nav_k,
                            bf16* crit_k) {
  std::copy(beta, beta + t.nk, x.beta.begin());
  std::copy(b, b + t.nk, x.b.begin());
  // P = E (α_i + β_j) and dS = P C - E (a_i + b_j), with E = exp(S) on valid pairs and C = 1 - g·g,
  // as bf16 matmul operands (rows beyond nq and columns beyond nk stay zero).
  for (int64_t i = 0; i < t.nq; ++i) {
    const bool row = qv[i];
    const __m512 ai = _mm512_set1_ps(row ? alpha[i] : 0.0f);
    const __m512 ci = _mm512_set1_ps(row ? a[i] : 0.0f);
    for (int64_t v = 0; v < key_vectors(t); ++v) {
      const int64_t o = i * t.nk_pad + 16 * v;
      __m512 p = _mm512_setzero_ps(), g = _mm512_setzero_ps();
      if (row) {
        const __m512 e = _mm512_mul_ps(exp16(load16(x.s.data() + o)), load16(x.k_mask.data() + 16 * v));
        const __m512 cost = _mm512_sub_ps(_mm512_set1_ps(1.0f), load16(x.c.data() + o));
        p = _mm512_mul_ps(e, _mm512_add_ps(ai, load16(x.beta.data() + 16 * v)));
        g = _mm512_fnmadd_ps(e, _mm512_add_ps(ci, load16(x.b.data() + 16 * v)), _mm512_mul_ps(p, cost));
      }
      store16(x.ds.data() + o, g);
      store16(x.plan.data() + o, p);
    }
  }
  const int64_t r = t.r;
  // Query side: dL/df(q) = dS f(k), dL/dg(q) = P g(k) (rows out directly).
  for (const auto& [factor, units, out] : {std::tuple{&x.ds, &x.fk, nav_q}, {&x.plan, &x.gk, crit_q}}) {
    pack_vnni(x.packed.data(), units->data(), t.nk_pad, r);
    gemm(x.out.data(), r, factor->data(), t.nk_pad, t.nq_pad, x.packed.data(), t.nk_pad, r, false);
    to_bf16(out, x.out.data(), t.nq * r);
  }
  // Key side: dL/df(k) = dSᵀ f(q), computed transposed, f(q)ᵀ dS (r, nk_pad), so that the (Nq, Nk)
  // matrix is only packed, not transposed; the (r, nk_pad) result is transposed instead.
  for (const auto& [factor, units, out] : {std::tuple{&x.ds, &x.fq, nav_k}, {&x.plan, &x.gq, crit_k}}) {
    transpose_to_bf16(x.units_t.data(), units->data(), t.nq_pad, r);  // (r, nq_pad)
    pack_vnni(x.packed.data(), factor->data(), t.nq_pad, t.nk_pad);
    gemm(x.out.data(), t.nk_pad, x.units_t.data(), t.nq_pad, r, x.packed.data(), t.nq_pad, t.nk_pad, false);
    transpose_to_bf16(x.out_rows.data(), x.out.data(), r, t.nk_pad);  // (nk_pad, r)
    std::copy(x.out_rows.begin(), x.out_rows.begin() + t.nk * r, out);
  }
}

// Runs fn(scratch, m) for every (sample, head) m in parallel, with S and g(q)·g(k) of m in the scratch.
template <typename Fn>
void for_each_sample_head(const TransportShape& t, const at::Tensor& nav, const at::Tensor& crit,
                          const at::Tensor& k_valid, Fn&& fn) {
  const at::Tensor kv = k_valid.contiguous();
  const bf16 *f = nav.data_ptr<bf16>(), *g = crit.data_ptr<bf16>();
  parallel_with_tiles(
      t.batch * t.heads, [&] { return TransportScratch(t); },
      [&](TransportScratch& x, int64_t m) {
        const int64_t q0 = m * t.nq * t.r, k0 = (t.query_rows + m * t.nk) * t.r;
        transport_matrices(x, t, f + q0, g + q0, f + k0, g + k0, kv.data_ptr<bool>() + (m / t.heads) * t.nk);
        fn(x, m);
      });
}

TransportShape checked_transport_shape(const at::Tensor& nav, const at::Tensor& crit, const at::Tensor& q_valid,
                                       const at::Tensor& k_valid, int64_t heads) {
  TORCH_CHECK(amx_permitted(), "ct_transport: the kernel did not grant this process the AMX tile state");
  TORCH_CHECK(q_valid.scalar_type() == at::kBool && q_valid.dim() == 2 && k_valid.scalar_type() == at::kBool &&
                  k_valid.dim() == 2 && q_valid.size(0) == k_valid.size(0),
              "ct_transport: q_valid / k_valid must be bool (B, Nq) / (B, Nk), got ", q_valid.sizes(), " ",
              q_valid.scalar_type(), " / ", k_valid.sizes(), " ", k_valid.scalar_type());
  const TransportShape t(q_valid.size(0), heads, q_valid.size(1), k_valid.size(1), nav.size(-1));
  for (const auto& [u, name] : {std::pair{&nav, "nav"}, {&crit, "crit"}})
    TORCH_CHECK(u->dim() == 2 && u->size(0) == t.batch * heads * (t.nq + t.nk) && u->size(1) == t.r &&
                    u->is_contiguous() && u->scalar_type() == at::kBFloat16,
                "ct_transport: ", name, " must be a contiguous bfloat16 (B·H·(Nq+Nk) = ",
                t.batch * heads * (t.nq + t.nk), ", ", t.r, ") tensor, got ", u->sizes(), " ", u->scalar_type());
  TORCH_CHECK(widths_supported({t.r}), "ct_transport: the helper output width must be a multiple of ",
              kWidthMultiple, ", got ", t.r);
  return t;
}

#endif  // VQA_ALIGN_ALIGNER_BLOCKS

// Forward: rows = queries (B, H, Nq, d) then keys (B, H, Nk, d). Returns the navigator's and the
// critic's unit outputs (R, r) bf16 and their norms (R,) fp32, R = B·H·(Nq + Nk).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_helpers_forward(
    const at::Tensor& queries, const at::Tensor& keys, at::TensorList weights) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const Helpers h = make_helpers(weights.vec(), false);
  const Sides sides = checked_sides("ct_helpers", queries, keys, h.d);
  const int64_t total_rows = sides.rows[0] + sides.rows[1];
  const auto bf = queries.options().dtype(at::kBFloat16), fp = queries.options().dtype(at::kFloat);
  at::Tensor nav = at::empty({total_rows, h.r}, bf), crit = at::empty({total_rows, h.r}, bf);
  at::Tensor nav_norm = at::empty({total_rows}, fp), crit_norm = at::empty({total_rows}, fp);
  bf16 *nav_p = nav.data_ptr<bf16>(), *crit_p = crit.data_ptr<bf16>();
  float *nav_norm_p = nav_norm.data_ptr<float>(), *crit_norm_p = crit_norm.data_ptr<float>();
  dispatch_rows(queries, [&](auto tag) {
    using T = decltype(tag);
    const StridedRows<const T> data[2] = {strided_rows<const T>(queries), strided_rows<const T>(keys)};
    forward_blocks(h, sides, data, nav_p, nav_norm_p, crit_p, crit_norm_p);
  });
  return {nav, nav_norm, crit, crit_norm};
#else
  (void)queries, (void)keys, (void)weights;
  TORCH_CHECK(false, "ct_helpers: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}

// Backward: from dL/d(navigator units) and dL/d(critic units) (R, r) bf16 (the latter times
// crit_sign), the stored units and norms of the forward -> dL/dqueries, dL/dkeys (their dtype) and
// the ten weight and bias gradients (fp32, in the order of `weights`).
std::vector<at::Tensor> ct_helpers_backward(const at::Tensor& queries, const at::Tensor& keys, at::TensorList weights,
                                            const at::Tensor& grad_nav, const at::Tensor& grad_crit, double crit_sign,
                                            const at::Tensor& nav, const at::Tensor& nav_norm, const at::Tensor& crit,
                                            const at::Tensor& crit_norm) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const Helpers h = make_helpers(weights.vec(), true);
  const Sides sides = checked_sides("ct_helpers", queries, keys, h.d);
  const int64_t total_rows = sides.rows[0] + sides.rows[1];
  for (const auto& [t, name] : {std::pair{&grad_nav, "grad_nav"}, {&grad_crit, "grad_crit"}, {&nav, "nav"}, {&crit, "crit"}})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == total_rows && t->size(1) == h.r && t->is_contiguous() &&
                    t->scalar_type() == at::kBFloat16,
                "ct_helpers: ", name, " must be a contiguous bfloat16 (", total_rows, ", ", h.r, ") tensor, got ",
                t->sizes(), " ", t->scalar_type());
  for (const auto& [t, name] : {std::pair{&nav_norm, "nav_norm"}, {&crit_norm, "crit_norm"}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == total_rows && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "ct_helpers: ", name, " must be a contiguous float32 (", total_rows, ",) tensor");
  const auto [grad_q, grad_k] = row_gradients(queries, keys);
  const GradSlots slots = ct_slots(h);
  GroupSums sums(slots, sides.total());
  const BackwardInputs in{grad_nav.data_ptr<bf16>(), grad_crit.data_ptr<bf16>(), nav.data_ptr<bf16>(),
                          crit.data_ptr<bf16>(), nav_norm.data_ptr<float>(), crit_norm.data_ptr<float>(),
                          static_cast<float>(crit_sign)};
  dispatch_sides(queries, keys, grad_q, grad_k,
                 [&](const auto* data, const auto* grads) { backward_blocks(h, sides, data, grads, in, sums); });
  std::vector<at::Tensor> out{grad_q, grad_k};
  sums.append_to(out, queries.options());
  return out;
#else
  (void)queries, (void)keys, (void)weights, (void)grad_nav, (void)grad_crit, (void)crit_sign, (void)nav,
      (void)nav_norm, (void)crit, (void)crit_norm;
  TORCH_CHECK(false, "ct_helpers: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}


// Transport forward from the helpers' unit outputs (R, r) bf16 (rows: queries then keys, as
// ct_helpers_forward returns them) and the masks q_valid (B, Nq), k_valid (B, Nk): the row sums
// (B, H, Nq) and column sums (B, H, Nk) of E = exp(S) on valid pairs and of E ⊙ C, C = 1 - g(q)·g(k),
// fp32, as transport_forward_ of alignment_glue.cpp but without writing E and C.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_transport_forward(
    const at::Tensor& nav, const at::Tensor& crit, const at::Tensor& q_valid, const at::Tensor& k_valid, int64_t heads) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const TransportShape t = checked_transport_shape(nav, crit, q_valid, k_valid, heads);
  const auto fp = nav.options().dtype(at::kFloat);
  at::Tensor row_sum = at::empty({t.batch, heads, t.nq}, fp), row_cost = at::empty({t.batch, heads, t.nq}, fp);
  at::Tensor col_sum = at::empty({t.batch, heads, t.nk}, fp), col_cost = at::empty({t.batch, heads, t.nk}, fp);
  const at::Tensor qv = q_valid.contiguous();
  for_each_sample_head(t, nav, crit, k_valid, [&](TransportScratch& x, int64_t m) {
    const int64_t q0 = m * t.nq, k0 = m * t.nk;
    transport_forward_one(x, t, qv.data_ptr<bool>() + (m / heads) * t.nq, row_sum.data_ptr<float>() + q0,
                          col_sum.data_ptr<float>() + k0, row_cost.data_ptr<float>() + q0,
                          col_cost.data_ptr<float>() + k0);
  });
  return {row_sum, col_sum, row_cost, col_cost};
#else
  (void)nav, (void)crit, (void)q_valid, (void)k_valid, (void)heads;
  TORCH_CHECK(false, "ct_transport: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}

// Transport backward: with α, a (B, H, Nq) and β, b (B, H, Nk) fp32, P = E ⊙ (α_i + β_j) and
// dS = P ⊙ C - E ⊙ (a_i + b_j) (E and C recomputed) -> dL/df = (dS f(k); dSᵀ f(q)) and
// dL/d(g·g) products (P g(k); Pᵀ g(q)), both (R, r) bf16 in the rows' layout.
std::tuple<at::Tensor, at::Tensor> ct_transport_backward(const at::Tensor& nav, const at::Tensor& crit,
                                                         const at::Tensor& q_valid, const at::Tensor& k_valid,
                                                         int64_t heads, const at::Tensor& alpha, const at::Tensor& beta,
                                                         const at::Tensor& a, const at::Tensor& b) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const TransportShape t = checked_transport_shape(nav, crit, q_valid, k_valid, heads);
  for (const auto& [v, name, n] : {std::tuple{&alpha, "alpha", t.nq}, {&a, "a", t.nq}, {&beta, "beta", t.nk}, {&b, "b", t.nk}})
    TORCH_CHECK(v->dim() == 3 && v->size(0) == t.batch && v->size(1) == heads && v->size(2) == n &&
                    v->is_contiguous() && v->scalar_type() == at::kFloat,
                "ct_transport: ", name, " must be a contiguous float32 (", t.batch, ", ", heads, ", ", n,
                ") tensor, got ", v->sizes(), " ", v->scalar_type());
  at::Tensor grad_nav = at::empty_like(nav), grad_crit = at::empty_like(crit);
  const at::Tensor qv = q_valid.contiguous();
  for_each_sample_head(t, nav, crit, k_valid, [&](TransportScratch& x, int64_t m) {
    const int64_t q0 = m * t.nq, k0 = m * t.nk, r = t.r, key_row0 = t.query_rows + k0;
    bf16 *nav_grad = grad_nav.data_ptr<bf16>(), *crit_grad = grad_crit.data_ptr<bf16>();
    transport_backward_one(x, t, qv.data_ptr<bool>() + (m / heads) * t.nq, alpha.data_ptr<float>() + q0,
                           beta.data_ptr<float>() + k0, a.data_ptr<float>() + q0, b.data_ptr<float>() + k0,
                           nav_grad + q0 * r, crit_grad + q0 * r, nav_grad + key_row0 * r, crit_grad + key_row0 * r);
  });
  return {grad_nav, grad_crit};
#else
  (void)nav, (void)crit, (void)q_valid, (void)k_valid, (void)heads, (void)alpha, (void)beta, (void)a, (void)b;
  TORCH_CHECK(false, "ct_transport: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}

// GAN discriminator forward: rows = queries (B, H, Nq, d) then keys (B, H, Nk, d); weights = gate
// (2d, d) and bias, hidden (h, d) and bias, output (1, h) and bias. Returns the logits (R,) fp32.
at::Tensor gan_discriminator_forward(const at::Tensor& queries, const at::Tensor& keys, at::TensorList weights,
                                     double slope) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const Discriminator D = make_discriminator(weights.vec(), slope, false);
  const Sides sides = checked_sides("gan_discriminator", queries, keys, D.d);
  at::Tensor logits = at::empty({sides.rows[0] + sides.rows[1]}, queries.options().dtype(at::kFloat));
  dispatch_rows(queries, [&](auto tag) {
    using T = decltype(tag);
    const StridedRows<const T> data[2] = {strided_rows<const T>(queries), strided_rows<const T>(keys)};
    parallel_with_tiles(
        sides.total(), [&] { return Block(D.d, 0, D.h); },
        [&](Block& b, int64_t block) {
          const auto [side, row0, n] = sides.locate(block);
          b.m = padded(n);
          gan_block_forward(b, D, data[side], row0, n,
                            logits.data_ptr<float>() + (side == 0 ? 0 : sides.rows[0]) + row0);
        });
  });
  return logits;
#else
  (void)queries, (void)keys, (void)weights, (void)slope;
  TORCH_CHECK(false, "gan_discriminator: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}

// GAN discriminator backward from dL/dlogits (R,) fp32 -> [dL/dqueries, dL/dkeys] times input_sign
// (-1: the gradient reversal) and the six weight and bias gradients (fp32, in the order of `weights`).
std::vector<at::Tensor> gan_discriminator_backward(const at::Tensor& queries, const at::Tensor& keys,
                                                   at::TensorList weights, double slope,
                                                   const at::Tensor& grad_logits, double input_sign) {
#ifdef VQA_ALIGN_ALIGNER_BLOCKS
  const Discriminator D = make_discriminator(weights.vec(), slope, true);
  const Sides sides = checked_sides("gan_discriminator", queries, keys, D.d);
  const int64_t total_rows = sides.rows[0] + sides.rows[1];
  TORCH_CHECK(grad_logits.dim() == 1 && grad_logits.size(0) == total_rows && grad_logits.is_contiguous() &&
                  grad_logits.scalar_type() == at::kFloat,
              "gan_discriminator: grad_logits must be a contiguous float32 (", total_rows, ",) tensor, got ",
              grad_logits.sizes(), " ", grad_logits.scalar_type());
  const auto [grad_q, grad_k] = row_gradients(queries, keys);
  const GradSlots slots = gan_slots(D);
  GroupSums sums(slots, sides.total());
  dispatch_sides(queries, keys, grad_q, grad_k, [&](const auto* data, const auto* grads) {
    parallel_with_tiles(
        sums.groups,
        [&] { return BlockBackwardScratch{Block(D.d, 0, D.h), BackwardScratch(D.d, std::max(D.h, 2 * D.d))}; },
        [&](BlockBackwardScratch& x, int64_t group) {
          for (int64_t block = sums.first_unit(group); block < sums.first_unit(group + 1); ++block) {
            const auto [side, row0, n] = sides.locate(block);
            x.b.m = padded(n);
            gan_block_backward(x.b, x.s, D, data[side], row0, n,
                               grad_logits.data_ptr<float>() + (side == 0 ? 0 : sides.rows[0]) + row0,
                               sums.of(group), slots, grads[side], static_cast<float>(input_sign));
          }
        });
  });
  std::vector<at::Tensor> out{grad_q, grad_k};
  sums.append_to(out, queries.options());
  out[6] = out[6].view({1, D.h});  // the output layer's weight (1, h)
  return out;
#else
  (void)queries, (void)keys, (void)weights, (void)slope, (void)grad_logits, (void)input_sign;
  TORCH_CHECK(false, "gan_discriminator: not built for this CPU (needs AMX and AVX-512-BF16)");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vqa_align_glue, m) {
  m.def("helper_blocks_supported(int[] widths) -> bool", &helper_blocks_supported);
  m.def("ct_helpers_forward(Tensor queries, Tensor keys, Tensor[] weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ct_helpers_backward(Tensor queries, Tensor keys, Tensor[] weights, Tensor grad_nav, Tensor grad_crit, "
      "float crit_sign, Tensor nav, Tensor nav_norm, Tensor crit, Tensor crit_norm) -> Tensor[]");
  m.def("gan_discriminator_forward(Tensor queries, Tensor keys, Tensor[] weights, float slope) -> Tensor");
  m.def(
      "gan_discriminator_backward(Tensor queries, Tensor keys, Tensor[] weights, float slope, Tensor grad_logits, "
      "float input_sign) -> Tensor[]");
  m.def("ct_transport_forward(Tensor nav, Tensor crit, Tensor q_valid, Tensor k_valid, int heads) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ct_transport_backward(Tensor nav, Tensor crit, Tensor q_valid, Tensor k_valid, int heads, Tensor alpha, "
      "Tensor beta, Tensor a, Tensor b) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vqa_align_glue, CPU, m) {
  m.impl("ct_helpers_forward", &ct_helpers_forward);
  m.impl("ct_helpers_backward", &ct_helpers_backward);
  m.impl("ct_transport_forward", &ct_transport_forward);
  m.impl("gan_discriminator_forward", &gan_discriminator_forward);
  m.impl("gan_discriminator_backward", &gan_discriminator_backward);
  m.impl("ct_transport_backward", &ct_transport_backward);
}
