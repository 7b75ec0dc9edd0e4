// The tiled attention (attention_tiles.h) at 16 lanes: a 32-key tile is two vectors, so the score
// loop, the softmax's exponentials and P.V take half the instructions of AVX2's. Over an f32 cache
// (Lanes16) the bits are AVX2's: scores and P.V never mix lanes, and the softmax does AVX2's
// operations per lane and adds its weights in AVX2's order. Over an f16 cache (Bf16Pairs) the
// products are BF16 pairs, which halves the instructions again at BF16's rounding: faster on Zen 5,
// slower on the AMX Xeon measured, whose level multiplies the same pairs on its tiles
// (attention_amx.cpp).
#include <stdexcept>

#include "attention_avx512.h"

namespace seqshare {

void stage_pairs_avx512(const std::uint16_t* k, const std::uint16_t* v, int head_dim, std::uint32_t* out) {
  switch (head_dim) {
    case 64: return Bf16Pairs::stage_whole<64>(k, v, out);
    case 128: return Bf16Pairs::stage_whole<128>(k, v, out);
    case 32: return Bf16Pairs::stage_whole<32>(k, v, out);
    default: throw std::invalid_argument("stage_pairs: head_dim must be 32, 64 or 128");
  }
}

void attention_avx512(const AttnArgs& a, int n0, int n1, int b) {
  const KeySpans& ks = a.job->keys;
  if (ks.span[0].f16 && (ks.n == 1 || ks.span[1].f16)) return attend_dim<Bf16Pairs, std::uint16_t>(a, n0, n1, b);
  attention_tiles<Lanes16>(a, n0, n1, b);
}

}  // namespace seqshare
