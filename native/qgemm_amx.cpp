// The panel GEMMs of q4, q5 and q8p (and the q4k / q5k K-scale panels) with AMX-INT8 (Sapphire
// Rapids and later Xeons) for prefill: whole tiles of 16 tokens x 16 rows (a pair of panels). One
// tdpbsud sums one group of int8 activations (the A tile, read in place from the quantized rows)
// against a pair's unsigned values (tdpbssd against signed ones for a symmetric panel), unpacked
// once per pair into the B tile's layout, 16 rows x 4 columns per 64-byte row: what a 512-bit Zmm
// load of two panels yields after its nibble steps (qgemm_zmm.h), so the unpack is those steps,
// stored. Tiles go in blocks of two token tiles x two pairs, so that each tile loaded feeds two
// products. Decode (fewer than 16 tokens), q8 rows, a lone last panel and the tokens left over run
// the AVX-512 kernels, and so does q6: its 16-column groups halve each product while the tile loads
// and stores stay, and it measured 3-13% slower than AVX-512. Against AVX-512 (bench/kernels.py,
// 2 cores, 512 tokens at Qwen2.5-1.5B's shapes): q4s, q8p, q4k and q5k 1.2-1.3x faster, q4 1.1-1.2x.
//
// Each group's sums are exact integers, and the float step is TileTokens::add (add_sym) on the same
// Zmm lanes with the same GroupScales, in group order: the results are the AVX-512 kernels' bits
// (and so every x86 level's), whatever the batch.
#include <algorithm>
#include <vector>

#include "amx.h"
#include "qgemm_zmm.h"

namespace seqshare {
namespace {

constexpr int kTokens = 16;  // an A / C tile's rows
constexpr int kRowBytes = 64;  // a B / C tile row: 16 weight rows x 4 bytes, or 16 int32

struct alignas(64) Line {  // one B tile row, or one 512-bit vector of floats
  std::uint8_t bytes[kRowBytes];
};

// Groups whose products are stored before their float steps run (amx_block), so that the float
// steps keep their accumulators in registers over kChunk groups. Two buffers of 3 groups' C tiles
// (24 KB) stay in L1 next to the A and B tiles: against one group at a time, 1.15-1.25x faster at
// Qwen2.5-1.5B's shapes (bench/kernels.py, q4s and q8p, 2 cores); 4 groups gained less, 8 (64 KB)
// lost 20%.
constexpr int kChunk = 3;

// Tiles: C tiles 0..3 hold the sums of token tile i x pair j at 2i + j; A tiles 4 and 6 hold the
// two token tiles' activations, B tiles 5 and 7 the two pairs' values. Each loaded tile feeds two
// tdpbsud: on the Xeon measured, a tile load or store costs more than a 16 x 16 x 32 product.
enum Tile { kC0 = 0, kC3 = 3, kA0 = 4, kB0 = 5, kA1 = 6, kB1 = 7 };
static_assert(kA0 == 4 && kB0 == 5 && kA1 == 6 && kB1 == 7, "block_sums and block_store spell these out");

// A tdpbsud takes at most 64 bytes of K: a group of 128 columns is two.
template <int G>
constexpr int kStep = G < 64 ? G : 64;
static_assert(kStep<32> == 32 && kStep<128> == 64);

template <int G>
void configure_tiles() {
  TileConfig c;
  for (int t = kC0; t <= kC3; ++t) c.colsb[t] = kRowBytes, c.rows[t] = kTokens;
  for (int t : {kA0, kA1}) c.colsb[t] = kStep<G>, c.rows[t] = kTokens;
  for (int t : {kB0, kB1}) c.colsb[t] = kRowBytes, c.rows[t] = kStep<G> / 4;
  load_tile_config(c);
}

// Panels `panel` and `panel + 1` as B tile rows: row 8b + i holds columns 32b + 4i .. + 3 of all 16
// weight rows. The nibble and fifth-bit steps are panel_tile's / q8p_tile's loads; a symmetric
// panel's values are made signed (q - 2^(bits - 1)), so that tdpbssd's sums are add_sym's.
template <int Bits, bool Sym>
void unpack_pair(const WeightView& w, int panel, Line* out) {
  using V = Zmm;
  constexpr int kBlock = panel_block_bytes(Bits);
  const int nb = w.cols / 32;
  const std::size_t panel_bytes = static_cast<std::size_t>(nb) * kBlock;
  const std::uint8_t* pw = static_cast<const std::uint8_t*>(w.data) + static_cast<std::size_t>(panel) * panel_bytes;
  const __m512i m4 = V::nibbles(), off = _mm512_set1_epi8(static_cast<char>(Sym ? 1 << (Bits - 1) : 0));
  for (int b = 0; b < nb; ++b, pw += kBlock, out += 8) {
    if constexpr (Bits == 8) {
      for (int j = 0; j < 8; ++j)
        _mm512_store_si512(out + j, _mm512_xor_si512(V::load_w(pw + 32 * j, panel_bytes), off));  // q + 128 -> q
      continue;
    }
    __m512i plane = V::zero_i();
    if constexpr (Bits == 5) plane = V::load_w(pw + 128, panel_bytes);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i raw = V::load_w(pw + 32 * j, panel_bytes);
      __m512i lo = V::low(raw, m4), hi = V::high(raw, m4);
      if constexpr (Bits == 5) {
        lo = V::template with_bits<1>(lo, plane, 2 * j);
        hi = V::template with_bits<1>(hi, plane, 2 * j + 1);
      }
      _mm512_store_si512(out + j, _mm512_sub_epi8(lo, off));
      _mm512_store_si512(out + 4 + j, _mm512_sub_epi8(hi, off));
    }
  }
}

// One group's exact integer sums for TT token tiles x PP pairs: C tile 2i + j (zeroed first) =
// token tile i's activations at a_i, group columns [0, G), against pair j's B rows at b_j (signed
// values for a symmetric panel: tdpbssd). gcc's tile intrinsics paste the tile number into the
// instruction's text, so the numbers are literals.
template <int G, int TT, int PP, bool Sym>
inline void block_sums(const std::int8_t* a0, const std::int8_t* a1, std::size_t a_stride, const Line* b0,
                       const Line* b1) {
  _tile_zero(0);
  if constexpr (PP == 2) _tile_zero(1);
  if constexpr (TT == 2) _tile_zero(2);
  if constexpr (TT == 2 && PP == 2) _tile_zero(3);
#pragma GCC unroll 2
  for (int s = 0; s < G / kStep<G>; ++s) {
    _tile_loadd(4, a0 + s * kStep<G>, a_stride);
    if constexpr (TT == 2) _tile_loadd(6, a1 + s * kStep<G>, a_stride);
    _tile_loadd(5, b0 + s * kStep<G> / 4, kRowBytes);
    if constexpr (PP == 2) _tile_loadd(7, b1 + s * kStep<G> / 4, kRowBytes);
    if constexpr (Sym) {
      _tile_dpbssd(0, 4, 5);
      if constexpr (PP == 2) _tile_dpbssd(1, 4, 7);
      if constexpr (TT == 2) _tile_dpbssd(2, 6, 5);
      if constexpr (TT == 2 && PP == 2) _tile_dpbssd(3, 6, 7);
    } else {
      _tile_dpbsud(0, 4, 5);
      if constexpr (PP == 2) _tile_dpbsud(1, 4, 7);
      if constexpr (TT == 2) _tile_dpbsud(2, 6, 5);
      if constexpr (TT == 2 && PP == 2) _tile_dpbsud(3, 6, 7);
    }
  }
}

// The C tiles as 16 x 16 int32 blocks, block 2i + j at c + 256 (2i + j).
template <int TT, int PP>
inline void block_store(std::int32_t* c) {
  constexpr int kBlock = kTokens * 16;
  _tile_stored(0, c, kRowBytes);
  if constexpr (PP == 2) _tile_stored(1, c + kBlock, kRowBytes);
  if constexpr (TT == 2) _tile_stored(2, c + 2 * kBlock, kRowBytes);
  if constexpr (TT == 2 && PP == 2) _tile_stored(3, c + 3 * kBlock, kRowBytes);
}

// The tile's sums are whole int32 sums, a symmetric panel's already of its signed values.
struct TileSums {
  static constexpr bool kInt16Sums = false;
};

// A pair unpacked (unpack_pair), and its groups' scales and minimums as the float step takes them.
struct PairBuf {
  std::vector<Line> b, scale;
};

template <int Bits, int G, bool KScales, bool Sym>
void prepare_pair(const WeightView& w, int panel, PairBuf& p) {
  const int ng = w.cols / G;
  p.b.resize(static_cast<std::size_t>(w.cols) / 4);
  p.scale.resize(2 * static_cast<std::size_t>(ng));
  unpack_pair<Bits, Sym>(w, panel, p.b.data());
  GroupScales<Zmm, Bits, G, KScales> scales(w, panel);
  for (int g = 0; g < ng; ++g) {
    __m512 dw, mw;
    scales.next(dw, mw);
    _mm512_store_ps(p.scale[2 * g].bytes, dw);
    _mm512_store_ps(p.scale[2 * g + 1].bytes, mw);
  }
}

// Groups [g0, g0 + n) of one C tile (group k's sums at c + k * step) into tok's accumulators, held
// in registers over the groups: 16 accumulators per token tile and pair would not fit 32 registers
// for all four tiles of a block, and reloading them per group cost as much as the float step.
template <int Bits, bool Sym, class Tok>
inline void add_groups(Tok& tok, int g0, int n, const std::int32_t* c, int step, const PairBuf& p) {
  __m512 acc[kTokens];
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) acc[t] = tok.acc[t];
  for (int k = 0; k < n; ++k, c += step) {
    const int g = g0 + k;
    const __m512 dw = _mm512_load_ps(p.scale[2 * g].bytes);
    __m512i a32[kTokens];
#pragma GCC unroll 16
    for (int t = 0; t < kTokens; ++t) a32[t] = _mm512_load_si512(c + 16 * t);
    if constexpr (Sym)
      tok.template add_sym_to<TileSums, Bits>(acc, g, a32, dw);
    else
      tok.add_to(acc, g, a32, dw, _mm512_load_ps(p.scale[2 * g + 1].bytes));
  }
#pragma GCC unroll 16
  for (int t = 0; t < kTokens; ++t) tok.acc[t] = acc[t];
}

// Y for TT token tiles (from xq) x PP pairs (rows from Y's first column), kChunk groups at a time.
// Software-pipelined: a chunk's products are issued and stored before the previous chunk's float
// steps, which run on the vector units meanwhile; the float steps stay in group order.
template <int Bits, int G, int TT, int PP, bool Sym>
void amx_block(const PairBuf* pb, const std::uint8_t* xq, std::size_t x_stride, int K, float* Y, int ldy) {
  constexpr int kBlock = kTokens * 16, kGroup = 4 * kBlock;  // one group's C tiles
  const int ng = K / G, ngp = (ng + 7) & ~7;
  TileTokens<Zmm, kTokens> tok[TT][PP];
  for (int i = 0; i < TT; ++i)
    for (int j = 0; j < PP; ++j) tok[i][j] = TileTokens<Zmm, kTokens>(xq + i * kTokens * x_stride, x_stride, K, ngp);
  const std::int8_t* a0 = tok[0][0].x[0];
  const std::int8_t* a1 = tok[TT - 1][0].x[0];
  const Line* b0 = pb[0].b.data();
  const Line* b1 = pb[PP - 1].b.data();
  // Ask for Y's lines now, for writing (prefetchw): the stores at the end would otherwise each wait
  // on a read for ownership (Y of a gate or up projection is 10 MB at 512 tokens), and the store
  // buffer they fill stalls the next block's start. 4864 x 896 at 512 tokens: 11.3-12.3 ms ->
  // 10.4-10.7 ms (three alternated runs).
  for (int t = 0; t < TT * kTokens; ++t)
    for (int j = 0; j < PP; ++j) __builtin_prefetch(Y + static_cast<std::size_t>(t) * ldy + 16 * j, 1, 3);
  alignas(64) std::int32_t c[2][kChunk * kGroup];
  const auto add = [&](int g0, int n, const std::int32_t* cc) {
    for (int j = 0; j < PP; ++j)
      for (int i = 0; i < TT; ++i) add_groups<Bits, Sym>(tok[i][j], g0, n, cc + (2 * i + j) * kBlock, kGroup, pb[j]);
  };
  int prev = -1;  // the chunk whose float steps are pending
  for (int g0 = 0; g0 < ng; g0 += kChunk) {
    const int n = std::min(kChunk, ng - g0);
    std::int32_t* cc = c[(g0 / kChunk) % 2];
    for (int k = 0; k < n; ++k) {
      const int g = g0 + k;
      block_sums<G, TT, PP, Sym>(a0 + g * G, a1 + g * G, x_stride, b0 + g * G / 4, b1 + g * G / 4);
      block_store<TT, PP>(cc + k * kGroup);
    }
    if (prev >= 0) add(prev, kChunk, c[(prev / kChunk) % 2]);
    prev = g0;
  }
  add(prev, ng - prev, c[(prev / kChunk) % 2]);
  for (int i = 0; i < TT; ++i)
    for (int j = 0; j < PP; ++j) tok[i][j].store(Y + 16 * j + static_cast<std::size_t>(i) * kTokens * ldy, ldy, 16);
}

// Rows whose pairs stay unpacked while the token blocks pass under them, and the activation bytes
// of a token block: the unit's second pass reads them from L2 (2 MiB per Sapphire Rapids core), not
// from L3. Unblocked, each 32-row pass streamed all the tokens' activations, 2.8 MB at 512 tokens
// of Qwen2.5-0.5B's down projection.
constexpr int kRowBlock = 64;
constexpr std::size_t kTileTokenBlockBytes = std::size_t{256} << 10;

// Tokens [n, n1) x the pair (two = false) or two pairs at pb, rows from r: two token tiles at a
// time, then one where 16 tokens are left.
template <int Bits, int G, bool Sym>
void amx_tiles(const PairBuf* pb, bool two, const std::uint8_t* xq, std::size_t x_stride, int K, int n, int n1,
               float* Y, int ldy, int r) {
  for (; n < n1; n += 2 * kTokens) {
    float* y = Y + r + static_cast<std::size_t>(n) * ldy;
    const std::uint8_t* x = xq + n * x_stride;
    if (n + 2 * kTokens > n1)
      two ? amx_block<Bits, G, 1, 2, Sym>(pb, x, x_stride, K, y, ldy)
          : amx_block<Bits, G, 1, 1, Sym>(pb, x, x_stride, K, y, ldy);
    else
      two ? amx_block<Bits, G, 2, 2, Sym>(pb, x, x_stride, K, y, ldy)
          : amx_block<Bits, G, 2, 1, Sym>(pb, x, x_stride, K, y, ldy);
  }
}

// Rows [r0, r1) (whole panel pairs) x tokens [0, N) (whole tiles of 16): kRowBlock rows at a time,
// their pairs unpacked once, under token blocks of about kTileTokenBlockBytes of activations; each
// block in tiles of two pairs x two token tiles (one of either where that many are left).
template <int Bits, int G, bool KScales, bool Sym>
void amx_run(const WeightView& w, const std::uint8_t* xq, int N, float* Y, int ldy, int r0, int r1) {
  const std::size_t x_stride = qacts_row_bytes_avx2(w.cols, G, false);
  const int block = std::max(1, static_cast<int>(kTileTokenBlockBytes / x_stride) / (2 * kTokens)) * 2 * kTokens;
  thread_local PairBuf pb[kRowBlock / 16];
  configure_tiles<G>();
  for (int rb = r0; rb < r1; rb += kRowBlock) {
    const int re = std::min(r1, rb + kRowBlock);
    for (int r = rb; r < re; r += 16) prepare_pair<Bits, G, KScales, Sym>(w, r / 8, pb[(r - rb) / 16]);
    for (int n0 = 0; n0 < N; n0 += block)
      for (int r = rb; r < re; r += 32)
        amx_tiles<Bits, G, Sym>(pb + (r - rb) / 16, r + 32 <= re, xq, x_stride, w.cols, n0, std::min(N, n0 + block),
                                Y, ldy, r);
  }
  _tile_release();
}

// The AMX tiles where they fit, the AVX-512 kernel `rest` for the rows and tokens they leave.
template <int Bits>
void qgemm_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1, QGemmFn rest) {
  const int n16 = N / kTokens * kTokens;
  const int r16 = n16 ? r0 + (r1 - r0) / 16 * 16 : r0;
  const auto* x = static_cast<const std::uint8_t*>(xq);
  if (r16 > r0)
    with_panel_layout<Bits>(w, [&](auto G, auto KScales) {
      with_symmetry<Bits, KScales.value>(w, [&](auto Sym) {
        amx_run<Bits, G.value, KScales.value, Sym.value>(w, x, n16, Y, ldy, r0, r16);
      });
    });
  if (n16 && r16 < r1) rest(w, xq, n16, Y, ldy, r16, r1);
  if (n16 < N) {
    const std::size_t x_stride = qacts_row_bytes_avx2(w.cols, w.group, false);
    rest(w, x + n16 * x_stride, N - n16, Y + static_cast<std::size_t>(n16) * ldy, ldy, r0, r1);
  }
}

}  // namespace

void qgemm_q4_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_amx<4>(w, xq, N, Y, ldy, r0, r1, qgemm_q4_avx512);
}

void qgemm_q5_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_amx<5>(w, xq, N, Y, ldy, r0, r1, qgemm_q5_avx512);
}

void qgemm_q8p_amx(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_amx<8>(w, xq, N, Y, ldy, r0, r1, qgemm_q8p_avx512);
}

}  // namespace seqshare
