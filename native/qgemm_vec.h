// The float and integer-zero steps every x86 integer GEMM policy shares, per vector width: the panel
// policies (qgemm_panel.h, qgemm_avx512.cpp) and the q8 row policies (qgemm_q8.h,
// qgemm_avx512.cpp) add their own loads and stores. Internal linkage, as in qgemm_panel.h; the
// 512-bit set exists only where the file is compiled with AVX-512.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace seqshare {
namespace {

inline std::int32_t load_i32(const std::int8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

struct Vec256 {
  using I = __m256i;
  using F = __m256;
  static I zero_i() { return _mm256_setzero_si256(); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static F bcast_f(const float* p) { return _mm256_broadcast_ss(p); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F to_f(I a) { return _mm256_cvtepi32_ps(a); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static F set1_f(float v) { return _mm256_set1_ps(v); }
  static I bcast_i(const std::int32_t* p) { return _mm256_set1_epi32(*p); }
  // The q4 panel's integer steps: 4 activation bytes to every lane, and a byte's two nibbles.
  static I bcast4(const std::int8_t* p) { return _mm256_set1_epi32(load_i32(p)); }
  static I nibbles() { return _mm256_set1_epi8(0x0F); }
  static I low(I raw, I m4) { return _mm256_and_si256(raw, m4); }
  static I high(I raw, I m4) { return _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4); }
  // q5/q6: the W bits from bit s of every byte of a bit plane (q5: its fifth bit, q6: its two high
  // bits), moved to bit 4 and added to the nibble. (16-bit shifts carry bits across bytes, but none
  // of those lands on bits 4 and 5.)
  template <int W>
  static I with_bits(I v, I plane, int s) {
    const I b = s <= 4 ? _mm256_slli_epi16(plane, 4 - s) : _mm256_srli_epi16(plane, s - 4);
    return _mm256_or_si256(v, _mm256_and_si256(b, _mm256_set1_epi8(((1 << W) - 1) << 4)));
  }
};

#ifdef __AVX512F__
struct Vec512 {
  using I = __m512i;
  using F = __m512;
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F bcast_f(const float* p) { return _mm512_set1_ps(*p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F to_f(I a) { return _mm512_cvtepi32_ps(a); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static F set1_f(float v) { return _mm512_set1_ps(v); }
  static I bcast_i(const std::int32_t* p) { return _mm512_set1_epi32(*p); }
  static I bcast4(const std::int8_t* p) { return _mm512_set1_epi32(load_i32(p)); }
  static I nibbles() { return _mm512_set1_epi8(0x0F); }
  static I low(I raw, I m4) { return _mm512_and_si512(raw, m4); }
  static I high(I raw, I m4) { return _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4); }
  template <int W>
  static I with_bits(I v, I plane, int s) {
    const I b = s <= 4 ? _mm512_slli_epi16(plane, 4 - s) : _mm512_srli_epi16(plane, s - 4);
    return _mm512_ternarylogic_epi32(v, b, _mm512_set1_epi8(((1 << W) - 1) << 4), 0xF8);  // v | (b & bits)
  }
};
#endif

}  // namespace
}  // namespace seqshare
