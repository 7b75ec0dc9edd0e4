#include "cpu.h"

#include <cstdlib>
#include <stdexcept>

#if defined(SEQSHARE_ARM)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(SEQSHARE_X86)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace seqshare {

#if defined(SEQSHARE_X86)
// Linux (5.16 and later) keeps the 8 KiB AMX tile state out of every thread's context until the
// process asks for it; without this the first tile instruction faults.
static bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures c;
#if defined(SEQSHARE_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2");
    c.fma = __builtin_cpu_supports("fma");
    c.f16c = true;  // every AVX2-capable x86 CPU also has F16C; gcc 12 has no probe name for it
    c.avx512f = __builtin_cpu_supports("avx512f");
    c.avx512bw = __builtin_cpu_supports("avx512bw");
    c.avx512vl = __builtin_cpu_supports("avx512vl");
    c.avx512dq = __builtin_cpu_supports("avx512dq");
    c.avx512vnni = __builtin_cpu_supports("avx512vnni");
    c.avx512bf16 = __builtin_cpu_supports("avx512bf16");
    c.avxvnni = __builtin_cpu_supports("avxvnni");
    c.amx_int8 = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") && amx_permitted();
    c.amx_bf16 = c.amx_int8 && __builtin_cpu_supports("amx-bf16");
#endif
#if defined(SEQSHARE_ARM)
    // The kernel's view of this CPU (under qemu-user: of the emulated CPU, QEMU_CPU).
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    c.asimd = hw & HWCAP_ASIMD;
    c.asimddp = hw & HWCAP_ASIMDDP;
    c.i8mm = hw2 & HWCAP2_I8MM;
#endif
    return c;
  }();
  return f;
}

bool cpu_runs(Isa isa) {
  const CpuFeatures& c = cpu_features();
  const bool avx2 = c.avx2 && c.fma && c.f16c;
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return avx2;
    case Isa::AvxVnni: return avx2 && c.avxvnni;
    // The AVX-512 variants use VNNI and BF16 instructions freely, so all of them are required.
    case Isa::Avx512:
      return avx2 && c.avx512f && c.avx512bw && c.avx512vl && c.avx512dq && c.avx512vnni && c.avx512bf16;
    case Isa::Amx: return cpu_runs(Isa::Avx512) && c.amx_int8 && c.amx_bf16;
    case Isa::Neon: return c.asimd;
    case Isa::Dotprod: return c.asimd && c.asimddp;
    case Isa::I8mm: return c.asimd && c.asimddp && c.i8mm;
  }
  return false;
}

static Isa detect() {
  int cap = kIsaCount - 1, floor = 1;
  if (const char* want = std::getenv("SEQSHARE_ISA")) {
    cap = static_cast<int>(isa_from_name(want));
    floor = cap >= static_cast<int>(Isa::Neon) ? static_cast<int>(Isa::Neon) : 1;  // the cap's architecture only
  }
  for (int i = cap; i >= floor; --i)
    if (cpu_runs(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::Scalar;
}

Isa best_isa() {
  static const Isa b = detect();
  return b;
}

static Isa& active_ref() {
  static Isa a = best_isa();
  return a;
}

Isa active_isa() { return active_ref(); }

bool isa_selectable(Isa isa) { return cpu_runs(isa) && static_cast<int>(isa) <= static_cast<int>(best_isa()); }

void set_isa(Isa isa) {
  if (!isa_selectable(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) +
                                " kernels (best: " + isa_name(best_isa()) + ")");
  active_ref() = isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::AvxVnni: return "avxvnni";
    case Isa::Avx512: return "avx512";
    case Isa::Amx: return "amx";
    case Isa::Neon: return "neon";
    case Isa::Dotprod: return "dotprod";
    case Isa::I8mm: return "i8mm";
  }
  return "?";
}

Isa isa_from_name(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avxvnni") return Isa::AvxVnni;
  if (name == "avx512") return Isa::Avx512;
  if (name == "amx") return Isa::Amx;
  if (name == "neon") return Isa::Neon;
  if (name == "dotprod") return Isa::Dotprod;
  if (name == "i8mm") return Isa::I8mm;
  throw std::invalid_argument("unknown ISA '" + name + "' (expected scalar, avx2, avxvnni, avx512, amx, neon, dotprod or i8mm)");
}

}  // namespace seqshare
