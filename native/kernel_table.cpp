// One dispatch table per ISA, built once. A variant missing for an ISA falls back to the next
// lower one, ending at the scalar reference.
#include "kernels.h"

namespace seqshare {

static KernelTable make_table(Isa isa) {
  KernelTable t{};
  t.dot_f32 = dot_f32_ref;
#if defined(SEQSHARE_X86)
  if (isa >= Isa::Avx2) {
    t.dot_f32 = dot_f32_avx2;
  }
  if (isa >= Isa::Avx512) {
    t.dot_f32 = dot_f32_avx512;
  }
#endif
  return t;
}

const KernelTable& kernel_table(Isa isa) {
  static const KernelTable tables[3] = {make_table(Isa::Scalar), make_table(Isa::Avx2),
                                        make_table(Isa::Avx512)};
  return tables[static_cast<int>(isa)];
}

}  // namespace seqshare
