// q4, q5, q6 and q8p panels with the dot-product extension (sdot; Cortex-A55/A76 and up, Neoverse): the panel's
// 16-byte groups are 4 rows x 4 columns, exactly what sdot-by-lane multiplies against 4 bytes of x.
// The tile and the float part are in qgemm_neon.h; the i8mm level reuses this for a lone token.
#include "qgemm_dotprod.h"

namespace seqshare {

void qgemm_q4_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SdotDot, 4>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q5_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SdotDot, 5>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q6_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SdotDot, 6>(w, xq, N, Y, ldy, r0, r1);
}

void qgemm_q8p_dotprod(const WeightView& w, const void* xq, int N, float* Y, int ldy, int r0, int r1) {
  qgemm_neon_panels<SdotDot, 8>(w, xq, N, Y, ldy, r0, r1);
}

}  // namespace seqshare
