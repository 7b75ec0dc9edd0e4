// CPU feature detection and the kernel-variant choice made once per process.
#pragma once
#include <string>

namespace seqshare {

// Ranked within each architecture: each level runs on CPUs with the features it names, and a CPU
// of one architecture runs none of the other's. x86: avxvnni is AVX2 plus the VEX-encoded VNNI of
// Alder Lake / Zen 5; avx512 needs AVX512-VNNI/BF16 but not AVX-VNNI (Zen 4 lacks it), so its
// kernels never use VEX VNNI and a lower level is not always runnable where a higher one is. amx is
// avx512 plus AMX-INT8 and AMX-BF16 tiles (Sapphire Rapids and later Xeons), which Linux must grant
// the process. avx512 multiplies BF16 pairs in attention over an f16 cache (attention_avx512.cpp)
// and amx multiplies the same pairs on its tiles (attention_amx.cpp), so their attention differs
// from avx2's by BF16 rounding (and from each other's by the tiles' order of addition); every x86
// level's integer GEMMs give avx2's bits.
// AArch64: neon is the base ISA (Cortex-A53/A72); dotprod adds sdot (A55/A76, Neoverse N1); i8mm
// adds smmla (A78/X1 and later, Neoverse V1/N2).
enum class Isa { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512 = 3, Amx = 4, Neon = 5, Dotprod = 6, I8mm = 7 };
constexpr int kIsaCount = 8;

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false;
  bool amx_int8 = false;  // AMX-TILE and AMX-INT8, and the kernel's permission to use the tile data
  bool amx_bf16 = false;
  bool asimd = false, asimddp = false, i8mm = false;  // from getauxval(AT_HWCAP / AT_HWCAP2)
};

const CpuFeatures& cpu_features();
// Whether this CPU can run the kernels of `isa`.
bool cpu_runs(Isa isa);
// The best variant this CPU runs; SEQSHARE_ISA=<level name> caps it (for tests and bisecting): the
// best runnable level of the cap's architecture at or below the cap (scalar if the CPU is not of
// that architecture).
Isa best_isa();
// Whether `isa` may be selected: this CPU runs it and it is not above best_isa().
bool isa_selectable(Isa isa);
// The variant in force: best_isa() unless set_isa() lowered it.
Isa active_isa();
// Select a variant; throws std::invalid_argument if this CPU cannot run it or it is above best_isa().
void set_isa(Isa isa);
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);

}  // namespace seqshare
