#pragma once
// Argument checks of indexed_linear_, shared by the CPU and CUDA kernels (index values are
// checked by each backend: an error on the CPU, a device-side assert on CUDA).
#include <cstdint>
#include <optional>

#include "adaptdiff/token_checks.h"

namespace adaptdiff {

// Whether the bytes spanned by a and b intersect (conservative for interleaved views; torch
// strides are never negative).
inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_alias_of(b) || a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto begin = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
    return std::pair{begin, begin + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

inline void check_indexed_linear_args(const at::Tensor& out, const at::Tensor& index,
                                      const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "indexed_linear_";
  check_floating(op, "out", out);
  check_token_index(op, out, "out", index);
  check_same_device(op, "x", x, "out", out);
  check_same_dtype(op, "x", x, "out", out);
  check_same_device(op, "weight", weight, "out", out);
  check_same_dtype(op, "weight", weight, "out", out);
  if (bias) {
    check_same_device(op, "bias", *bias, "out", out);
    check_same_dtype(op, "bias", *bias, "out", out);
  }
  const int64_t B = out.size(0), O = out.size(2), K = index.size(1);
  check_dim(op, "weight", weight, 2, "[O, I]");
  ADAPTDIFF_CHECK(x.dim() == 3 && x.size(0) == B && x.size(1) == K, op,
                  "x must have shape [B, K, I] with B=", B, ", K=", K, ", got ", x.sizes());
  ADAPTDIFF_CHECK(weight.size(0) == O && weight.size(1) == x.size(2), op,
                  "weight must have shape [O, I] = [", O, ", ", x.size(2), "], got ",
                  weight.sizes());
  if (bias) {
    ADAPTDIFF_CHECK(bias->dim() == 1 && bias->size(0) == O, op, "bias must have shape [O] = [", O,
                    "], got ", bias->sizes());
  }
  ADAPTDIFF_CHECK(out.is_contiguous(), op,
                  "out must be contiguous (it is written in place), got shape ", out.sizes(),
                  " with strides ", out.strides());
  // Rows of out are written while the product is still being read or computed.
  auto check_no_overlap = [&](const char* name, const at::Tensor& t) {
    ADAPTDIFF_CHECK(!spans_overlap(out, t), op, name, " must not share memory with out");
  };
  check_no_overlap("x", x);
  check_no_overlap("weight", weight);
  if (bias) check_no_overlap("bias", *bias);
}

}  // namespace adaptdiff
