#pragma once
// Launch helpers for the CUDA kernels. Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in
// cuBLAS/cuSPARSE headers, which the compile-only check against the CPU wheel does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace adaptdiff::cuda {

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned blocks_for(int64_t n, int threads, int64_t max_blocks = 65535LL * 32) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

// Widest vector type that divides the row size and both base addresses.
inline int copy_width(const void* a, const void* b, int64_t row_bytes) {
  const auto pa = reinterpret_cast<std::uintptr_t>(a), pb = reinterpret_cast<std::uintptr_t>(b);
  for (int w : {16, 8, 4}) {
    if (row_bytes % w == 0 && pa % w == 0 && pb % w == 0) return w;
  }
  return 2;
}

template <int W> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };

// Calls f.template operator()<W>() with the widest usable copy width W.
template <typename F>
void with_copy_width(int w, F&& f) {
  switch (w) {
    case 16: f.template operator()<16>(); break;
    case 8: f.template operator()<8>(); break;
    case 4: f.template operator()<4>(); break;
    default: f.template operator()<2>(); break;
  }
}

}  // namespace adaptdiff::cuda
