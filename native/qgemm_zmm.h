// Two 8-row panels side by side in one 512-bit vector, for the AVX-512 panel tiles
// (qgemm_avx512.cpp) and for unpacking panel pairs into AMX tiles (qgemm_amx.cpp). Internal linkage,
// as in qgemm_panel.h; include it only where AVX-512 is compiled in.
#pragma once
#include "qgemm_panel.h"

namespace seqshare {
namespace {

// Two panels side by side: rows r..r+7 in the low 256 bits, r+8..r+15 in the high ones. Each lane
// still holds one row's integers and one row's floats, so the results are the Ymm policy's bits.
struct Zmm : Vec512 {
  static constexpr int kRows = 16;
  static I load_w(const std::uint8_t* p, std::size_t panel_bytes) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + panel_bytes)), 1);
  }
  static F load_h(const std::uint16_t* p, std::size_t panel_halves) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + panel_halves)), 1));
  }
  static F load_u8(const std::uint8_t* p, std::size_t next) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16(p, next)));
  }
  static F load_i8(const std::uint8_t* p, std::size_t next) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16(p, next)));
  }
  static void store(float* y, int nrows, F v) {
    _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << nrows) - 1), v);
  }

 private:
  static __m128i bytes16(const std::uint8_t* p, std::size_t next) {  // 8 bytes of each panel
    return _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + next)));
  }
};

}  // namespace
}  // namespace seqshare
