// The integer GEMMs with AVX512-VNNI (EVEX vpdpbusd / vpdpwssd: Ice Lake and later, Zen 4): q4,
// q5, q6 and q8p panels (qgemm_panel.h) and q8 rows (qgemm_q8.h). Many tokens take 512-bit vectors holding two
// panels or two rows side by side, which halves the instructions per multiply-add
// (bench/kernels.py, Zen 5, 2 cores, 512 tokens: q4 619 -> 1,198 and q8 230 -> 408 GFLOP/s).
// Decode's one or two tokens take the 256-bit tiles, which stream from memory faster. EVEX reaches
// 32 vector registers, so tiles hold more tokens and rows than the AVX2 ones. Every lane holds one
// output's integers and runs its float steps in the order every other x86 ISA does, so the results
// are theirs bit for bit.
#include "qgemm_panel.h"
#include "qgemm_q8.h"
#include "qgemm_zmm.h"

namespace seqshare {

namespace {

struct Avx512ByteDot {
  using V = Ymm;
  static constexpr int tokens(int, int) { return 12; }  // 12 float + 12 int32 accumulators of 32 registers
  static constexpr bool kInt16Sums = false;
  static __m256i start(__m256i a32) { return a32; }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
  static __m256i finish(__m256i, __m256i acc) { return acc; }
};

struct Avx512PanelPairDot {
  using V = Zmm;
  using Narrow = Avx512ByteDot;  // a lone last panel
  static constexpr int tokens(int, int) { return 12; }  // 12 float + 12 int32 accumulators of 32 registers
  static constexpr bool kInt16Sums = false;
  static __m512i start(__m512i a32) { return a32; }
  static __m512i add(__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }
  static __m512i madd(__m512i acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static __m512i finish(__m512i, __m512i acc) { return acc; }
};

struct Avx512WordDot {
  using V = Q8Ymm;
  static constexpr int kR = 4, kT = 4;  // 16 accumulators
  static __m256i madd(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }
};

// q8 rows two at a time: row r's 8 lanes in the low 256 bits of a vector, row r + 1's in the high
// ones. Every lane holds the integers and runs the float steps of the 256-bit tile, so the results
// are its bits, with half the instructions per multiply-add.
struct Q8Zmm : Vec512 {
  static constexpr int kRows = 2;
  static I load_w(const std::int8_t* p, std::size_t row_bytes) {
    return _mm512_cvtepi8_epi16(
        _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + row_bytes)), 1));
  }
  static I load_x(const std::int16_t* p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F scale(const std::uint16_t* p, int group_stride) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(h16_scalar(p[0])), h16_scalar(p[group_stride]), 1);
  }
  static void store(float* y, F v) {
    y[0] = hsum8(_mm512_castps512_ps256(v));
    y[1] = hsum8(_mm512_extractf32x8_ps(v, 1));
  }
};

struct Avx512RowPairWordDot {
  using V = Q8Zmm;
  using Narrow = Avx512WordDot;  // a lone last row, and decode (streams faster from memory, measured)
  static constexpr int kR = 2, kT = 6;  // 2 pairs x 6 tokens: 12 float accumulators of 32 registers
  static __m512i madd(__m512i acc, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(acc, w, x); }
};

// The amx level's q8 rows (AMX-INT8 does not multiply int16 activations): the same kernels, but
// decode's narrow tile takes 3 rows, not 4. On the Xeon measured (2 cores, bench/kernels.py
// --formats q8 --tokens 1 --shape qwen2.5-1.5b --layers 12, alternated) the fewer interleaved row
// streams read 22.1-23.0 -> 25.4-26.1 GB/s from memory, 2 rows 26.5 and 6 rows 22.5; from the
// caches (the default model's decode, its head q8) 3 rows were as fast as 4 and 2 rows 4% slower.
// Which rows a tile holds changes no output's arithmetic.
struct AmxNarrowWordDot : Avx512WordDot {
  static constexpr int kR = 3;
};
struct AmxRowPairWordDot : Avx512RowPairWordDot {
  using Narrow = AmxNarrowWordDot;
};

}  // namespace

void qgemm_q4_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<Avx512PanelPairDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<Avx512PanelPairDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<Avx512PanelPairDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_panels<Avx512PanelPairDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_avx512(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<Avx512RowPairWordDot>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_q8_rows<AmxRowPairWordDot>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
