// Baseline Advanced SIMD (every AArch64 CPU: Cortex-A53/A72 and up) for the float GEMMs, the
// activation quantisation, q8 weights x int16 activations and the elementwise kernels. The
// dotprod and i8mm levels reuse all of these; they differ only in the q4 kernel (qgemm_*.cpp).
//
// Every output element is computed by the same sequence of operations whatever the tile it falls
// in or the number of tokens, so a row's result does not depend on the batch.
#include <cmath>
#include <cstring>

#include "half.h"
#include "kernels.h"
#include "neon.h"

namespace seqshare {

float dot_f32_neon(const float* a, const float* b, std::size_t n) {
  float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
    acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
  }
  float s = vaddvq_f32(vaddq_f32(acc0, acc1));
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}

// ---- float weights: R rows x T tokens of FMAs, 4 columns per step ------------------------------
namespace {

struct LoadF32 {
  static float32x4_t v(const void* w, std::size_t i) { return vld1q_f32(static_cast<const float*>(w) + i); }
  static float s(const void* w, std::size_t i) { return static_cast<const float*>(w)[i]; }
};
struct LoadF16 {
  static float32x4_t v(const void* w, std::size_t i) { return neon::load4(static_cast<const std::uint16_t*>(w) + i); }
  static float s(const void* w, std::size_t i) { return f16_to_f32(static_cast<const std::uint16_t*>(w)[i]); }
};
struct LoadBF16 {
  static float32x4_t v(const void* w, std::size_t i) {
    return neon::load4_bf16(static_cast<const std::uint16_t*>(w) + i);
  }
  static float s(const void* w, std::size_t i) { return bf16_to_f32(static_cast<const std::uint16_t*>(w)[i]); }
};

template <class L, int R, int T>
void float_tile(const WeightView& w, const float* X, float* Y, int ldy, int r, int n) {
  const std::size_t K = static_cast<std::size_t>(w.cols), K4 = K & ~std::size_t(3);
  float32x4_t acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < T; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  for (std::size_t k = 0; k < K4; k += 4) {
    float32x4_t wv[R];
    for (int i = 0; i < R; ++i) wv[i] = L::v(w.data, (r + i) * K + k);
    for (int j = 0; j < T; ++j) {
      const float32x4_t xv = vld1q_f32(X + (n + j) * K + k);
      for (int i = 0; i < R; ++i) acc[i][j] = vfmaq_f32(acc[i][j], wv[i], xv);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < T; ++j) {
      float s = vaddvq_f32(acc[i][j]);
      for (std::size_t k = K4; k < K; ++k) s = std::fma(L::s(w.data, (r + i) * K + k), X[(n + j) * K + k], s);
      Y[static_cast<std::size_t>(n + j) * ldy + r + i] = s;
    }
}

template <class L, int R>
void float_rows(const WeightView& w, const float* X, int N, float* Y, int ldy, int r) {
  int n = 0;
  for (; n + 4 <= N; n += 4) float_tile<L, R, 4>(w, X, Y, ldy, r, n);
  for (; n < N; ++n) float_tile<L, R, 1>(w, X, Y, ldy, r, n);
}

template <class L>
void gemm_float(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  int r = r0;
  for (; r + 4 <= r1; r += 4) float_rows<L, 4>(w, X, N, Y, ldy, r);
  for (; r < r1; ++r) float_rows<L, 1>(w, X, N, Y, ldy, r);
}

}  // namespace

void gemm_f32_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm_float<LoadF32>(w, X, N, Y, ldy, r0, r1);
}
void gemm_f16_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm_float<LoadF16>(w, X, N, Y, ldy, r0, r1);
}
void gemm_bf16_neon(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  gemm_float<LoadBF16>(w, X, N, Y, ldy, r0, r1);
}

// ---- activation quantisation: the reference's layout and the reference's integers --------------
// amax, d = amax / qmax, 1 / d and x * (1 / d) rounded to nearest even are the reference's exact
// float operations, so every ARM level quantises bit for bit as quantize_acts_ref does.
void quantize_acts_neon(const float* x, int cols, int G, bool for_q8, void* out) {
  const int qmax = for_q8 ? 32767 : 127, ng = cols / G;
  auto* q8 = static_cast<std::int8_t*>(out);
  auto* q16 = static_cast<std::int16_t*>(out);
  float* d = reinterpret_cast<float*>(static_cast<std::uint8_t*>(out) + (for_q8 ? 2 : 1) * static_cast<std::size_t>(cols));
  float* s = d + ng;
  for (int g = 0; g < ng; ++g) {
    const float* xg = x + static_cast<std::size_t>(g) * G;
    float32x4_t amax = vdupq_n_f32(0.0f);
    for (int i = 0; i < G; i += 4) amax = vmaxq_f32(amax, vabsq_f32(vld1q_f32(xg + i)));
    const float dg = vmaxvq_f32(amax) / static_cast<float>(qmax);
    const float32x4_t id = vdupq_n_f32(dg > 0.0f ? 1.0f / dg : 0.0f);
    int32x4_t sum = vdupq_n_s32(0);
    for (int i = 0; i < G; i += 8) {
      const int32x4_t a = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(xg + i), id));
      const int32x4_t b = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(xg + i + 4), id));
      const int16x8_t h = vcombine_s16(vmovn_s32(a), vmovn_s32(b));  // within range: no saturation needed
      if (for_q8) {
        vst1q_s16(q16 + static_cast<std::size_t>(g) * G + i, h);
      } else {
        vst1_s8(q8 + static_cast<std::size_t>(g) * G + i, vmovn_s16(h));
        sum = vaddq_s32(sum, vaddq_s32(a, b));
      }
    }
    d[g] = dg;
    if (!for_q8) s[g] = dg * static_cast<float>(vaddvq_s32(sum));
  }
}

// ---- q8 weights x int16 activations: widening multiply-accumulates (smlal) ---------------------
// The integer sum of a group is exact (|w| <= 127, |x| <= 32767, G <= 128 fits int32); each group
// then adds float(sum lanes) * (d_w * d_x) into four float lanes, summed once at the end.
namespace {

template <int G, int R, int T>
void q8_tile(const WeightView& w, const std::uint8_t* xq, std::size_t stride, float* Y, int ldy, int r, int n) {
  const std::size_t K = static_cast<std::size_t>(w.cols);
  const int ng = w.cols / G;
  const auto* W = static_cast<const std::int8_t*>(w.data);
  float32x4_t acc[R][T];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < T; ++j) acc[i][j] = vdupq_n_f32(0.0f);
  for (int g = 0; g < ng; ++g) {
    int32x4_t isum[R][T];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < T; ++j) isum[i][j] = vdupq_n_s32(0);
    for (int c = g * G; c < (g + 1) * G; c += 16) {
      int16x8_t wl[R], wh[R];
      for (int i = 0; i < R; ++i) {
        const int8x16_t b = vld1q_s8(W + (r + i) * K + c);
        wl[i] = vmovl_s8(vget_low_s8(b));
        wh[i] = vmovl_high_s8(b);
      }
      for (int j = 0; j < T; ++j) {
        const auto* x = reinterpret_cast<const std::int16_t*>(xq + (n + j) * stride) + c;
        const int16x8_t xl = vld1q_s16(x), xh = vld1q_s16(x + 8);
        for (int i = 0; i < R; ++i) {
          isum[i][j] = vmlal_s16(isum[i][j], vget_low_s16(wl[i]), vget_low_s16(xl));
          isum[i][j] = vmlal_high_s16(isum[i][j], wl[i], xl);
          isum[i][j] = vmlal_s16(isum[i][j], vget_low_s16(wh[i]), vget_low_s16(xh));
          isum[i][j] = vmlal_high_s16(isum[i][j], wh[i], xh);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const float dw = f16_to_f32(w.scales[static_cast<std::size_t>(r + i) * ng + g]);
      for (int j = 0; j < T; ++j) {
        const float dx = reinterpret_cast<const float*>(xq + (n + j) * stride + 2 * K)[g];
        acc[i][j] = vfmaq_n_f32(acc[i][j], vcvtq_f32_s32(isum[i][j]), dw * dx);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < T; ++j) Y[static_cast<std::size_t>(n + j) * ldy + r + i] = vaddvq_f32(acc[i][j]);
}

template <int G, int R>
void q8_tokens(const WeightView& w, const std::uint8_t* xq, std::size_t stride, int N, float* Y, int ldy, int r) {
  int n = 0;
  for (; n + 4 <= N; n += 4) q8_tile<G, R, 4>(w, xq, stride, Y, ldy, r, n);
  for (; n < N; ++n) q8_tile<G, R, 1>(w, xq, stride, Y, ldy, r, n);
}

template <int G>
void q8_run(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  const auto* x = static_cast<const std::uint8_t*>(xq);
  const std::size_t stride = qacts_row_bytes_ref(w.cols, G, true);
  int r = r0;
  for (; r + 2 <= r1; r += 2) q8_tokens<G, 2>(w, x, stride, N, Y, ldy, r);
  for (; r < r1; ++r) q8_tokens<G, 1>(w, x, stride, N, Y, ldy, r);
}

}  // namespace

void qgemm_q8_neon(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  with_group(w.group, [&](auto G) { q8_run<G.value>(w, xq, N, Y, ldy, r0, r1); });
}

// ---- elementwise --------------------------------------------------------------------------------
void rmsnorm_neon(const float* x, const float* weight, float eps, int dim, float* y) {
  float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
  int i = 0;
  for (; i + 8 <= dim; i += 8) {
    const float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + 4);
    acc0 = vfmaq_f32(acc0, a, a);
    acc1 = vfmaq_f32(acc1, b, b);
  }
  double ss = vaddvq_f32(vaddq_f32(acc0, acc1));
  for (; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
  i = 0;
  for (; i + 4 <= dim; i += 4) vst1q_f32(y + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), inv), vld1q_f32(weight + i)));
  for (; i < dim; ++i) y[i] = x[i] * inv * weight[i];
}

void silu_mul_neon(float* gate, const float* up, std::size_t n) {
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t g = vld1q_f32(gate + i);
    const float32x4_t e = neon::exp(vnegq_f32(g));
    vst1q_f32(gate + i, vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add_neon(float* y, const float* x, std::size_t n) {
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vld1q_f32(y + i), vld1q_f32(x + i)));
  for (; i < n; ++i) y[i] += x[i];
}

// vcvt rounds to nearest even, as f32_to_f16 does (FPCR's default mode; Linux never changes it).
void f32_to_f16_neon(const float* src, std::uint16_t* dst, std::size_t n) {
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
  for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void f16_to_f32_neon(const std::uint16_t* src, float* dst, std::size_t n) {
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, neon::load4(src + i));
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

}  // namespace seqshare
