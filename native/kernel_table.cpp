// One dispatch table per ISA, built once. A variant missing for an ISA falls back to a lower one
// that the same CPUs run (avx512 and amx skip avxvnni: Zen 4 has AVX-512 but not AVX-VNNI; i8mm and
// dotprod fall back to neon), ending at the scalar reference.
#include "kernels.h"

namespace seqshare {

static void fill_ref(KernelTable& t) {
  t.dot_f32 = dot_f32_ref;
  t.gemm[0] = gemm_f32_ref;
  t.gemm[1] = gemm_f16_ref;
  t.gemm[2] = gemm_bf16_ref;
  t.qacts_row_bytes = qacts_row_bytes_ref;
  t.quantize_acts = quantize_acts_ref;
  t.qgemm[0] = qgemm_q8_ref;
  t.qgemm[1] = t.qgemm[2] = t.qgemm[3] = t.qgemm[4] = qgemm_panel_ref;
  t.attention = attention_ref;
  t.stage_pairs = nullptr;
  t.rmsnorm = rmsnorm_ref;
  t.silu_mul = silu_mul_ref;
  t.add = add_ref;
  t.f32_to_f16 = f32_to_f16_ref;
  t.f16_to_f32 = f16_to_f32_ref;
}

static KernelTable make_table(Isa isa) {
  KernelTable t{};
  fill_ref(t);
#if defined(SEQSHARE_X86)
  if (isa >= Isa::Avx2 && isa <= Isa::Amx) {
    t.dot_f32 = dot_f32_avx2;
    t.gemm[0] = gemm_f32_avx2;
    t.gemm[1] = gemm_f16_avx2;
    t.gemm[2] = gemm_bf16_avx2;
    t.qacts_row_bytes = qacts_row_bytes_avx2;
    t.quantize_acts = quantize_acts_avx2;
    t.qgemm[0] = qgemm_q8_avx2;
    t.qgemm[1] = qgemm_q4_avx2;
    t.qgemm[2] = qgemm_q5_avx2;
    t.qgemm[3] = qgemm_q6_avx2;
    t.qgemm[4] = qgemm_q8p_avx2;
    t.attention = attention_avx2;
    t.rmsnorm = rmsnorm_avx2;
    t.silu_mul = silu_mul_avx2;
    t.add = add_avx2;
    t.f32_to_f16 = f32_to_f16_avx2;
    t.f16_to_f32 = f16_to_f32_avx2;
  }
  if (isa == Isa::AvxVnni) {
    t.qgemm[0] = qgemm_q8_avxvnni;
    t.qgemm[1] = qgemm_q4_avxvnni;
    t.qgemm[2] = qgemm_q5_avxvnni;
    t.qgemm[3] = qgemm_q6_avxvnni;
    t.qgemm[4] = qgemm_q8p_avxvnni;
  }
  if (isa == Isa::Avx512 || isa == Isa::Amx) {
    t.dot_f32 = dot_f32_avx512;
    t.quantize_acts = quantize_acts_avx512;
    t.silu_mul = silu_mul_avx512;
    t.qgemm[0] = qgemm_q8_avx512;
    t.qgemm[1] = qgemm_q4_avx512;
    t.qgemm[2] = qgemm_q5_avx512;
    t.qgemm[3] = qgemm_q6_avx512;
    t.qgemm[4] = qgemm_q8p_avx512;
    t.attention = attention_avx512;
    t.stage_pairs = stage_pairs_avx512;
  }
  // q8 weights take int16 activations, which AMX-INT8 does not multiply (qgemm_q8_amx is AVX-512
  // tuned for these CPUs), and q6 measured slower on the tiles (qgemm_amx.cpp): it stays on avx512.
  if (isa == Isa::Amx) {
    t.qgemm[0] = qgemm_q8_amx;
    t.attention = attention_amx;
    t.qgemm[1] = qgemm_q4_amx;
    t.qgemm[2] = qgemm_q5_amx;
    t.qgemm[4] = qgemm_q8p_amx;
  }
#endif
#if defined(SEQSHARE_ARM)
  if (isa >= Isa::Neon) {
    t.dot_f32 = dot_f32_neon;
    t.gemm[0] = gemm_f32_neon;
    t.gemm[1] = gemm_f16_neon;
    t.gemm[2] = gemm_bf16_neon;
    t.quantize_acts = quantize_acts_neon;  // into the reference layout: qacts_row_bytes stays _ref
    t.qgemm[0] = qgemm_q8_neon;
    t.qgemm[1] = qgemm_q4_neon;
    t.qgemm[2] = qgemm_q5_neon;
    t.qgemm[3] = qgemm_q6_neon;
    t.qgemm[4] = qgemm_q8p_neon;
    t.attention = attention_neon;
    t.rmsnorm = rmsnorm_neon;
    t.silu_mul = silu_mul_neon;
    t.add = add_neon;
    t.f32_to_f16 = f32_to_f16_neon;
    t.f16_to_f32 = f16_to_f32_neon;
  }
  // q8 weights take int16 activations, which neither sdot nor smmla multiplies: smlal serves all levels.
  if (isa >= Isa::Dotprod) {
    t.qgemm[1] = qgemm_q4_dotprod;
    t.qgemm[2] = qgemm_q5_dotprod;
    t.qgemm[3] = qgemm_q6_dotprod;
    t.qgemm[4] = qgemm_q8p_dotprod;
  }
  if (isa >= Isa::I8mm) {
    t.qgemm[1] = qgemm_q4_i8mm;
    t.qgemm[2] = qgemm_q5_i8mm;
    t.qgemm[3] = qgemm_q6_i8mm;
    t.qgemm[4] = qgemm_q8p_i8mm;
  }
#endif
  return t;
}

const KernelTable& kernel_table(Isa isa) {
  static const KernelTable tables[kIsaCount] = {make_table(Isa::Scalar), make_table(Isa::Avx2),
                                                make_table(Isa::AvxVnni), make_table(Isa::Avx512),
                                                make_table(Isa::Amx),
                                                make_table(Isa::Neon),    make_table(Isa::Dotprod),
                                                make_table(Isa::I8mm)};
  return tables[static_cast<int>(isa)];
}

}  // namespace seqshare
