// Kernel table. Each kernel has a scalar reference (`*_ref`, the spec) and SIMD variants with the
// same signature; `kernels()` returns the table for the active ISA, falling back to the reference
// wherever a variant does not exist. Kernels are single-threaded: threading lives in threadpool.h.
#pragma once
#include <cstddef>
#include <cstdint>

#include "cpu.h"

namespace seqshare {

using DotF32Fn = float (*)(const float* a, const float* b, std::size_t n);

struct KernelTable {
  DotF32Fn dot_f32;
};

// Scalar references (the spec).
float dot_f32_ref(const float* a, const float* b, std::size_t n);

// SIMD variants (declared everywhere, defined only in x86 builds).
float dot_f32_avx2(const float* a, const float* b, std::size_t n);
float dot_f32_avx512(const float* a, const float* b, std::size_t n);

const KernelTable& kernel_table(Isa isa);
inline const KernelTable& kernels() { return kernel_table(active_isa()); }

}  // namespace seqshare
