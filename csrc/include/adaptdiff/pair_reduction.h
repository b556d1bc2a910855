#pragma once
// Per-sample reductions of two same-shaped tensors a[B, ...], b[B, ...] -> [B] float32
// (rel_l1, cosine): their checks and their arithmetic, shared by the CPU and CUDA kernels.
// A Terms struct names its op (kOp), says what one element pair adds to each of its K sums
// (`add`, run in the accumulation type) and turns the K finished sums (double) into the
// result (`finish`).
#include <c10/macros/Macros.h>

#include <cmath>

#include "adaptdiff/checks.h"

namespace adaptdiff {

// Same checks, same order and wording as python/adaptdiff/ops/_pair_reduction.py.
inline void check_pair_reduction(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_floating(op, "a", a);
  check_same_dtype(op, "b", b, "a", a);
  check_same_device(op, "b", b, "a", a);
  ADAPTDIFF_CHECK(a.dim() >= 1, op, "a must have a batch dimension [B, ...], got a 0-D tensor");
  ADAPTDIFF_CHECK(a.sizes() == b.sizes(), op, "b must have the shape of a ", a.sizes(), ", got ",
                  b.sizes());
}

template <typename T>
C10_HOST_DEVICE inline T abs_of(T x) {
#ifdef __CUDA_ARCH__
  return ::fabs(x);
#else
  return std::fabs(x);
#endif
}

// max(x, lo) that keeps a NaN x (as torch's clamp_min does).
C10_HOST_DEVICE inline double clamp_min_nan(double x, double lo) { return x < lo ? lo : x; }

// sum|a - b| / max(sum|b|, 1e-12). `s` strides by `stride` between the K sums, so the CPU
// kernel can keep each sum in its own row of SIMD lanes.
struct RelL1Terms {
  static constexpr const char* kOp = "rel_l1";
  static constexpr int K = 2;
  template <typename T>
  C10_HOST_DEVICE static void add(T* s, int stride, T x, T y) {
    s[0] += abs_of(x - y);
    s[stride] += abs_of(y);
  }
  C10_HOST_DEVICE static float finish(const double* s) {
    return static_cast<float>(s[0] / clamp_min_nan(s[1], 1e-12));
  }
};

// <a, b> / max(sqrt(|a|^2 |b|^2), 1e-8): the formula of reference.cosine.
struct CosineTerms {
  static constexpr const char* kOp = "cosine";
  static constexpr int K = 3;
  template <typename T>
  C10_HOST_DEVICE static void add(T* s, int stride, T x, T y) {
    s[0] += x * y;
    s[stride] += x * x;
    s[2 * stride] += y * y;
  }
  C10_HOST_DEVICE static float finish(const double* s) {
    return static_cast<float>(s[0] / clamp_min_nan(::sqrt(s[1] * s[2]), 1e-8));
  }
};

}  // namespace adaptdiff
