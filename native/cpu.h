// CPU feature detection and the kernel-variant choice made once per process.
#pragma once
#include <string>

namespace seqshare {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false;
};

const CpuFeatures& cpu_features();
// The best variant this CPU runs; SEQSHARE_ISA=scalar|avx2|avx512 caps it (for tests and bisecting).
Isa best_isa();
// The variant in force: best_isa() unless set_isa() lowered it.
Isa active_isa();
// Select a variant; throws std::invalid_argument if this CPU cannot run it.
void set_isa(Isa isa);
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);

}  // namespace seqshare
