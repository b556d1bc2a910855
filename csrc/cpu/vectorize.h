#pragma once
// What the CPU kernels need to vectorise. The library is built for the baseline ISA (SSE2 on
// x86-64), so:
// - the hot loops get an AVX2 clone beside the baseline one, picked once at load time (GCC
//   function multiversioning); the clones do the same operations in the same order;
// - half and bfloat16 are converted to float (and back) in blocks. c10::Half's scalar
//   conversion does not vectorise at the baseline (its selects become branches), so half takes
//   the F16C instructions when the CPU has them (checked once at run time) and otherwise the
//   same branch-free algorithm as c10 (Maratos's) with the selects spelled as bit masks. Every
//   path gives the same bits (round to nearest even), NaN payloads aside.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ADAPTDIFF_X86_F16C 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPTDIFF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ADAPTDIFF_CPU_CLONES
#endif

namespace adaptdiff::cpu {

inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t two_w = w + w;
  const float normal = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(static_cast<int32_t>(h & 0x7fff) < 0x400);
  return std::bit_cast<float>((w & 0x80000000u) | (std::bit_cast<uint32_t>(subnormal) & is_sub) |
                              (std::bit_cast<uint32_t>(normal) & ~is_sub));
}

// Round to nearest even; NaN becomes the canonical 0x7e00 with the sign kept.
inline uint16_t float_to_half_bits(float f) {
  const float scaled = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const int32_t bias = std::max(static_cast<int32_t>(shl1_w >> 24), 0x71);
  const float rounded =
      std::bit_cast<float>((static_cast<uint32_t>(bias) << 23) + 0x07800000u) + scaled;
  const uint32_t bits = std::bit_cast<uint32_t>(rounded);
  const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  const int32_t magnitude = static_cast<int32_t>(w & 0x7fffffffu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(magnitude > 0x7f800000);
  return static_cast<uint16_t>(((w & 0x80000000u) >> 16) | (0x7e00u & is_nan) |
                               (nonsign & ~is_nan));
}

template <typename T>
inline void to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#ifdef ADAPTDIFF_X86_F16C
// ADAPTDIFF_NO_F16C=1 forces the portable path (the tests use it to cover that path here).
inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c") &&
                          std::getenv("ADAPTDIFF_NO_F16C") == nullptr;
  return has;
}

__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const uint16_t* src,
                                                                   float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* src,
                                                                   uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

template <>
inline void to_float(const c10::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_f16c()) return half_to_float_f16c(bits, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(bits[i]);
}

template <typename T>
inline void from_float(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <>
inline void from_float(const float* __restrict__ src, c10::Half* __restrict__ dst, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_f16c()) return float_to_half_f16c(src, bits, n);
#endif
  for (int64_t i = 0; i < n; ++i) bits[i] = float_to_half_bits(src[i]);
}

}  // namespace adaptdiff::cpu
