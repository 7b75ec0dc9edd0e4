// The tiled attention (attention_tiles.h) with AVX2: 8-lane scores and P.V.
#include "attention_tiles.h"

namespace seqshare {

void attention_avx2(const AttnArgs& a, int n0, int n1, int b) { attention_tiles<Lanes8>(a, n0, n1, b); }

}  // namespace seqshare
