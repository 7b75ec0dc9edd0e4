// Scalar reference kernels: the specification every SIMD variant is tested against.
#include "kernels.h"

namespace seqshare {

float dot_f32_ref(const float* a, const float* b, std::size_t n) {
  double acc = 0.0;  // double accumulation: the reference should be the most exact of the variants
  for (std::size_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(acc);
}

}  // namespace seqshare
