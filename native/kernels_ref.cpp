// Scalar reference kernels: the specification every SIMD variant is tested against. They
// accumulate in double so that they are the most exact of the variants.
#include <cmath>
#include <cstring>

#include "half.h"
#include "kernels.h"

namespace seqshare {

float dot_f32_ref(const float* a, const float* b, std::size_t n) {
  double acc = 0.0;
  for (std::size_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(acc);
}

// ---- float weights ----------------------------------------------------------------------------
template <typename Load>
static void gemm_float_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1,
                           Load load) {
  const std::size_t K = static_cast<std::size_t>(w.cols);
  for (int r = r0; r < r1; ++r) {
    for (int n = 0; n < N; ++n) {
      const float* x = X + n * K;
      double acc = 0.0;
      for (std::size_t k = 0; k < K; ++k) acc += static_cast<double>(load(r * K + k)) * x[k];
      Y[static_cast<std::size_t>(n) * ldy + r] = static_cast<float>(acc);
    }
  }
}

void gemm_f32_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  const float* W = static_cast<const float*>(w.data);
  gemm_float_ref(w, X, N, Y, ldy, r0, r1, [W](std::size_t i) { return W[i]; });
}

void gemm_f16_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  const auto* W = static_cast<const std::uint16_t*>(w.data);
  gemm_float_ref(w, X, N, Y, ldy, r0, r1, [W](std::size_t i) { return f16_to_f32(W[i]); });
}

void gemm_bf16_ref(const WeightView& w, const float* X, int N, float* Y, int ldy, int r0, int r1) {
  const auto* W = static_cast<const std::uint16_t*>(w.data);
  gemm_float_ref(w, X, N, Y, ldy, r0, r1, [W](std::size_t i) { return bf16_to_f32(W[i]); });
}

// ---- quantised activations ----------------------------------------------------------------
// Reference layout of one quantised row: for q4, int8 q[cols], float d[cols/group], float
// s[cols/group]; for q8, int16 q[cols], float d[cols/group]. Padded to 64 bytes.
std::size_t qacts_row_bytes_ref(int cols, int group, bool for_q8) {
  const std::size_t ng = static_cast<std::size_t>(cols / group);
  const std::size_t b = for_q8 ? 2u * cols + 4u * ng : static_cast<std::size_t>(cols) + 8u * ng;
  return (b + 63) & ~static_cast<std::size_t>(63);
}

void quantize_acts_ref(const float* x, int cols, int group, bool for_q8, void* out) {
  const int qmax = for_q8 ? 32767 : 127;
  auto* q8 = static_cast<std::int8_t*>(out);
  auto* q16 = static_cast<std::int16_t*>(out);
  float* d = reinterpret_cast<float*>(static_cast<std::uint8_t*>(out) + (for_q8 ? 2 : 1) * static_cast<std::size_t>(cols));
  float* s = d + cols / group;
  for (int g = 0; g < cols / group; ++g) {
    const float* xg = x + g * group;
    float amax = 0.0f;
    for (int i = 0; i < group; ++i) amax = std::fmax(amax, std::fabs(xg[i]));
    const float dg = amax / static_cast<float>(qmax);
    const float id = dg > 0.0f ? 1.0f / dg : 0.0f;
    int sum = 0;
    for (int i = 0; i < group; ++i) {
      const int v = static_cast<int>(std::nearbyint(xg[i] * id));
      if (for_q8)
        q16[g * group + i] = static_cast<std::int16_t>(v);
      else
        q8[g * group + i] = static_cast<std::int8_t>(v);
      sum += v;
    }
    d[g] = dg;
    if (!for_q8) s[g] = dg * static_cast<float>(sum);
  }
}

void qgemm_q8_ref(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  const int K = w.cols, G = w.group, ng = K / G;
  const std::size_t stride = qacts_row_bytes_ref(K, G, true);
  const auto* W = static_cast<const std::int8_t*>(w.data);
  for (int n = 0; n < N; ++n) {
    const auto* q = reinterpret_cast<const std::int16_t*>(static_cast<const std::uint8_t*>(xq) + n * stride);
    const float* d = reinterpret_cast<const float*>(q + K);
    for (int r = r0; r < r1; ++r) {
      const std::int8_t* wr = W + static_cast<std::size_t>(r) * K;
      double acc = 0.0;
      for (int g = 0; g < ng; ++g) {
        std::int64_t isum = 0;
        for (int i = g * G; i < (g + 1) * G; ++i) isum += wr[i] * q[i];
        acc += static_cast<double>(f16_to_f32(w.scales[static_cast<std::size_t>(r) * ng + g])) * d[g] *
               static_cast<double>(isum);
      }
      Y[static_cast<std::size_t>(n) * ldy + r] = static_cast<float>(acc);
    }
  }
}

// Panels: sum_g d_w * d_x * sum(q_w * q_x) + m_w * s_x, with q_w the unsigned values (0..15, 0..31,
// 0..63) and a symmetric panel's m_w = -2^(bits - 1) d_w.
void qgemm_panel_ref(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  const int K = w.cols, G = w.group, ng = K / G;
  const std::size_t stride = qacts_row_bytes_ref(K, G, false);
  for (int n = 0; n < N; ++n) {
    const auto* q = static_cast<const std::int8_t*>(xq) + n * stride;
    const float* d = reinterpret_cast<const float*>(q + K);
    const float* s = d + ng;
    for (int r = r0; r < r1; ++r) {
      double acc = 0.0;
      for (int g = 0; g < ng; ++g) {
        int isum = 0;
        for (int c = g * G; c < (g + 1) * G; ++c) isum += panel_q_at(w, r, c) * q[c];
        acc += static_cast<double>(panel_scale_at(w, r, g)) * d[g] * isum +
               static_cast<double>(panel_min_at(w, r, g)) * s[g];
      }
      Y[static_cast<std::size_t>(n) * ldy + r] = static_cast<float>(acc);
    }
  }
}

// ---- elementwise --------------------------------------------------------------------------------
void rmsnorm_ref(const float* x, const float* weight, float eps, int dim, float* y) {
  double ss = 0.0;
  for (int i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
  for (int i = 0; i < dim; ++i) y[i] = x[i] * inv * weight[i];
}

void silu_mul_ref(float* gate, const float* up, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void add_ref(float* y, const float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] += x[i];
}

void f32_to_f16_ref(const float* src, std::uint16_t* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

void f16_to_f32_ref(const std::uint16_t* src, float* dst, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

}  // namespace seqshare
