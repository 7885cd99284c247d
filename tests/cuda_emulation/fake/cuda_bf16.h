#pragma once
// Host stand-in for cuda_bf16.h (tests/cuda_emulation): bf16 bits, round-to-nearest-even from fp32.
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // NaN stays a (quiet) NaN
  u += 0x7fff + ((u >> 16) & 1);
  return {uint16_t(u >> 16)};
}
