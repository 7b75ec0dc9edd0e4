// Kernel table. Each kernel has a scalar reference (`*_ref`, the spec) and SIMD variants with the
// same signature; `kernels()` returns the table for the active ISA, falling back to the reference
// wherever a variant does not exist. Kernels are single-threaded: threading lives in ops.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu.h"
#include "ops.h"

namespace seqshare {

// ---- linear ---------------------------------------------------------------------------------
// Float weights (f32/f16/bf16): Y[n, r] = X[n, :] . W[r, :] for rows r in [r0, r1), all N tokens.
// X is (N, w.cols), Y is (N, ldy). fp32 FMA, no quantisation of X.
using GemmFn = void (*)(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);

// Quantised weights multiply quantised activations: each token's row is cut into blocks of
// w.group values, block b stored as d_b * q_b. The panels (q4 .. q8p) take int8 activations (q in
// -127..127, with s_b = d_b * sum(q_b) for the weights' minimum), as llama.cpp does; q8 weights take
// int16 activations (q in -32767..32767): int8 x int8 loses ~2.5 points of top-1 agreement with float
// on an int8 bundle, int8 x int16 almost nothing. q8p is the same 8-bit weights for int8 activations
// (GGUF Q8_0 as llama.cpp runs it): VNNI's byte dot products do twice the multiply-adds of its word
// ones. The byte layout of one quantised row is private to the ISA that wrote it (`qacts_row_bytes` tells its size); only the same ISA's qgemm reads it.
using QActsRowBytesFn = std::size_t (*)(int cols, int group, bool for_q8);
using QuantizeActsFn = void (*)(const float* x, int cols, int group, bool for_q8, void* out);
// Y[n, r] for rows [r0, r1): xq holds N quantised rows of `qacts_row_bytes` bytes each.
using QGemmFn = void (*)(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);

// Compile-time sizes for the integer kernels' templates: f(std::integral_constant<int, G>{}) for the
// weight's group size (check_weight allows only 32, 64 and 128, and 16 for q6 alone), and
// f(integral_constant<int, T'>) for the T' = `left` tokens (0 < left < T) a tile of T leaves over.
template <class F>
inline void with_group(int group, F&& f) {
  switch (group) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}
// The same for a panel weight of `Bits` bits, with whether its scales are K scales:
// f(integral_constant<int, G>, bool_constant<KScales>). q6 has only its 16-column groups, so no other
// size is instantiated for it (nor 16 for the others), and K-scale panels only their one group size.
template <int Bits, class F>
inline void with_panel_layout(const WeightView& w, F&& f) {
  if constexpr (is_kscale_bits(Bits)) {
    if (w.kscales) return f(std::integral_constant<int, kscale_group(Bits)>{}, std::true_type{});
  }
  if constexpr (Bits == 6)
    f(std::integral_constant<int, kQ6Group>{}, std::false_type{});
  else
    with_group(w.group, [&](auto G) { f(G, std::false_type{}); });
}
// f(integral_constant<bool, Sym>) for a panel layout's symmetry: no mins plane, so the minimum is
// -2^(bits - 1) x the scale. q6, q6k and q8p are always symmetric (ops.h: mins are q4/q5's only);
// q4k and q5k keep minimums in their K scales.
template <int Bits, bool KScales, class F>
inline void with_symmetry(const WeightView& w, F&& f) {
  if constexpr (Bits == 6 || Bits == 8)
    f(std::true_type{});
  else if constexpr (KScales)
    f(std::false_type{});
  else if (w.mins)
    f(std::false_type{});
  else
    f(std::true_type{});
}
template <int T, class F>
inline void with_tokens(int left, F&& f) {
  if constexpr (T > 1) {
    if (left == T - 1) return f(std::integral_constant<int, T - 1>{});
    with_tokens<T - 1>(left, f);
  }
}
// The q4 kernels' loop: tile(r, n, nrows, integral_constant<int, T'>) for each Rows-row step (one
// 8-row panel, or two) of rows [r0, r1) (r0 a multiple of 8: ops split rows in whole panels;
// nrows < Rows only in the last) and the N tokens in tiles of T' = T, then one smaller tile for the
// N % T left over. With `block` (a multiple of T) the tokens go in blocks of that many, each block
// under all the rows before the next: the block's activations stay in the cache while the rows pass.
template <int T, int Rows = 8, class F>
inline void for_panel_tiles(int N, int r0, int r1, F&& tile, int block = std::numeric_limits<int>::max()) {
  for (int b0 = 0; b0 < N; b0 += block) {
    const int b1 = N - b0 < block ? N : b0 + block;
    for (int r = r0; r < r1; r += Rows) {
      const int nrows = r1 - r < Rows ? r1 - r : Rows;
      int n = b0;
      for (; n + T <= b1; n += T) tile(r, n, nrows, std::integral_constant<int, T>{});
      if (n < b1) with_tokens<T>(b1 - n, [&](auto L) { tile(r, n, nrows, L); });
    }
  }
}

// D::Narrow where an integer kernel's policy D holds two panels or rows per vector (the policy for
// a lone last one, and for decode), else D itself.
template <class D, class = void>
struct NarrowOf {
  using type = D;
};
template <class D>
struct NarrowOf<D, std::void_t<typename D::Narrow>> {
  using type = typename D::Narrow;
};

// ---- attention ------------------------------------------------------------------------------
struct AttnArgs {
  const AttnJob* job;
  int n_heads, n_kv_heads, head_dim;
  float scale;
  AttnStates st;
};
// Queries [n0, n1) of the job, all heads: advance their states of block `b` over the job's keys in
// that block (see AttnJob). Tiles start at absolute positions that are multiples of kAttnTile; keys
// outside the job's range or the spans are masked.
using AttnFn = void (*)(const AttnArgs& a, int n0, int n1, int b);
// One whole 32-row tile of an f16 cache as BF16 pairs (kv.h's pair tile, 32 x head_dim words): its
// K block (head_dim, 32) and its first V row. head_dim 32, 64 or 128.
using StagePairsFn = void (*)(const std::uint16_t* k, const std::uint16_t* v, int head_dim, std::uint32_t* out);

// The keys of block `b` a job covers: positions [lo, hi) (none when lo >= hi), clipped to what its
// spans hold, and whether the block's states are resumed rather than started empty.
struct BlockKeys {
  int lo, hi;
  bool resume;
};
inline BlockKeys block_keys(const AttnJob& j, int b) {
  const int start = b * kAttnBlock;
  const KVSpan& first = j.keys.span[0];
  const KVSpan& last = j.keys.span[j.keys.n - 1];
  int lo = j.p_begin > start ? j.p_begin : start;
  int hi = j.p_end < start + kAttnBlock ? j.p_end : start + kAttnBlock;
  if (lo < first.pos0) lo = first.pos0;
  if (hi > last.pos0 + last.len) hi = last.pos0 + last.len;
  return BlockKeys{lo, hi, j.continues && j.p_begin > start};
}
// Where the key at absolute position p lives: its span and row (p must be covered).
inline const KVSpan& key_span(const KeySpans& ks, int p, int& row) {
  const KVSpan& s = (ks.n == 2 && p >= ks.span[1].pos0) ? ks.span[1] : ks.span[0];
  row = p - s.pos0;
  return s;
}
inline int state_row(const AttnJob& j, int n) { return j.state_row ? j.state_row[n] : n; }

// ---- elementwise ----------------------------------------------------------------------------
using RmsNormFn = void (*)(const float* x, const float* weight, float eps, int dim, float* y);
using SiluMulFn = void (*)(float* gate, const float* up, std::size_t n);
using AddFn = void (*)(float* y, const float* x, std::size_t n);
using F32ToF16Fn = void (*)(const float* src, std::uint16_t* dst, std::size_t n);
using F16ToF32Fn = void (*)(const std::uint16_t* src, float* dst, std::size_t n);

using DotF32Fn = float (*)(const float* a, const float* b, std::size_t n);

struct KernelTable {
  DotF32Fn dot_f32;
  GemmFn gemm[3];  // indexed by WFmt F32, F16, BF16
  QActsRowBytesFn qacts_row_bytes;
  QuantizeActsFn quantize_acts;
  QGemmFn qgemm[5];  // [0] = q8, [1] = q4, [2] = q5, [3] = q6, [4] = q8p (WFmt order)
  AttnFn attention;
  StagePairsFn stage_pairs;  // null where `attention` reads no pair tiles
  RmsNormFn rmsnorm;
  SiluMulFn silu_mul;
  AddFn add;
  F32ToF16Fn f32_to_f16;
  F16ToF32Fn f16_to_f32;
};

// Scalar references (the spec).
float dot_f32_ref(const float* a, const float* b, std::size_t n);
void gemm_f32_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_f16_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_bf16_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
std::size_t qacts_row_bytes_ref(int cols, int group, bool for_q8);
void quantize_acts_ref(const float* x, int cols, int group, bool for_q8, void* out);
void qgemm_q8_ref(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_panel_ref(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);  // q4 .. q8p
void attention_ref(const AttnArgs& a, int n0, int n1, int b);
void rmsnorm_ref(const float* x, const float* weight, float eps, int dim, float* y);
void silu_mul_ref(float* gate, const float* up, std::size_t n);
void add_ref(float* y, const float* x, std::size_t n);
void f32_to_f16_ref(const float* src, std::uint16_t* dst, std::size_t n);
void f16_to_f32_ref(const std::uint16_t* src, float* dst, std::size_t n);

// SIMD variants (declared everywhere, defined only in x86 builds).
float dot_f32_avx2(const float* a, const float* b, std::size_t n);
void gemm_f32_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_f16_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_bf16_avx2(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
std::size_t qacts_row_bytes_avx2(int cols, int group, bool for_q8);
// The offsets 2^(bits - 1) of symmetric q4, q5, q6 and q8p panels, in the order in which an x86
// activation row keeps -sum(q) x each (qgemm_avx2.cpp): sym_offset_row(bits) is its index.
constexpr int kSymOffsets[4] = {8, 16, 32, 128};
constexpr int sym_offset_row(int bits) { return bits == 8 ? 3 : bits - 4; }
// What follows the int8 values of an x86 activation row (qgemm_avx2.cpp's layout), written by
// every x86 quantizer: per group its scale, scale x sum(q) and the offset terms, zero past the
// groups up to ngp (ng rounded up to 8).
class QActsTail {
 public:
  QActsTail(void* row, int cols, int group)
      : ng_(cols / group),
        ngp_((cols / group + 7) & ~7),
        d_(reinterpret_cast<float*>(static_cast<std::int8_t*>(row) + cols)),
        offset_(reinterpret_cast<std::int32_t*>(d_ + 2 * ngp_)) {}
  int groups() const { return ng_; }
  void set(int g, float dg, int total) {
    d_[g] = dg;
    d_[ngp_ + g] = dg * static_cast<float>(total);
    for (int k = 0; k < 4; ++k) offset_[k * ngp_ + g] = -total * kSymOffsets[k];
  }
  void pad() {
    for (int g = ng_; g < ngp_; ++g) {
      d_[g] = d_[ngp_ + g] = 0.0f;
      for (int k = 0; k < 4; ++k) offset_[k * ngp_ + g] = 0;
    }
  }

 private:
  int ng_, ngp_;
  float* d_;
  std::int32_t* offset_;
};
void quantize_acts_avx2(const float* x, int cols, int group, bool for_q8, void* out);
void qgemm_q8_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q4_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_avx2(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void attention_avx2(const AttnArgs& a, int n0, int n1, int b);
void rmsnorm_avx2(const float* x, const float* weight, float eps, int dim, float* y);
void silu_mul_avx2(float* gate, const float* up, std::size_t n);
void add_avx2(float* y, const float* x, std::size_t n);
void f32_to_f16_avx2(const float* src, std::uint16_t* dst, std::size_t n);
void f16_to_f32_avx2(const std::uint16_t* src, float* dst, std::size_t n);
void qgemm_q8_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q4_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_avxvnni(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
float dot_f32_avx512(const float* a, const float* b, std::size_t n);
void silu_mul_avx512(float* gate, const float* up, std::size_t n);  // AVX2's bits
void quantize_acts_avx512(const float* x, int cols, int group, bool for_q8, void* out);  // AVX2's bytes
void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void attention_avx512(const AttnArgs& a, int n0, int n1, int b);
void stage_pairs_avx512(const std::uint16_t* k, const std::uint16_t* v, int head_dim, std::uint32_t* out);
void attention_amx(const AttnArgs& a, int n0, int n1, int b);  // AVX-512
void qgemm_q8_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);  // AVX-512
void qgemm_q4_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);

// ARM variants (declared everywhere, defined only in AArch64 builds). The ARM levels quantise
// activations into the reference layout (qacts_row_bytes_ref).
float dot_f32_neon(const float* a, const float* b, std::size_t n);
void gemm_f32_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_f16_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void gemm_bf16_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1);
void quantize_acts_neon(const float* x, int cols, int group, bool for_q8, void* out);
void qgemm_q8_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q4_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void attention_neon(const AttnArgs& a, int n0, int n1, int b);
void rmsnorm_neon(const float* x, const float* weight, float eps, int dim, float* y);
void silu_mul_neon(float* gate, const float* up, std::size_t n);
void add_neon(float* y, const float* x, std::size_t n);
void f32_to_f16_neon(const float* src, std::uint16_t* dst, std::size_t n);
void f16_to_f32_neon(const std::uint16_t* src, float* dst, std::size_t n);
void qgemm_q4_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q4_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q5_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q6_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);
void qgemm_q8p_i8mm(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1);

const KernelTable& kernel_table(Isa isa);
inline const KernelTable& kernels() { return kernel_table(active_isa()); }

}  // namespace seqshare
