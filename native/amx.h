// The AMX tile configuration (ldtilecfg's operand, palette 1), shared by the GEMMs (qgemm_amx.cpp)
// and the attention (attention_amx.cpp). Each configures the tiles it uses on entry and releases
// them on exit, so either may run after the other on a pool thread. Include it only where AMX is
// compiled in.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace seqshare {
namespace {

struct TileConfig {
  std::uint8_t palette = 1, start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

inline void load_tile_config(const TileConfig& c) {
  // gcc 12's _tile_loadconfig tells the compiler it reads 8 bytes of `c`: without this barrier the
  // other stores may be dropped, and ldtilecfg faults on what the stack held.
  __asm__ __volatile__("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

}  // namespace
}  // namespace seqshare
