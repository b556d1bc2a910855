#pragma once
// Checks of lincomb, shared by the CPU and CUDA kernels; same order and wording as the fake
// in python/adaptdiff/ops/lincomb.py.
#include <c10/util/ArrayRef.h>

#include <string>

#include "adaptdiff/checks.h"

namespace adaptdiff {

inline void check_lincomb(at::TensorList tensors, at::ArrayRef<double> coeffs) {
  constexpr const char* op = "lincomb";
  ADAPTDIFF_CHECK(!tensors.empty(), op, "tensors must hold at least one tensor, got none");
  ADAPTDIFF_CHECK(coeffs.size() == tensors.size(), op, "coeffs must have one entry per tensor (",
                  tensors.size(), "), got ", coeffs.size());
  const at::Tensor& first = tensors[0];
  check_floating(op, "tensors[0]", first);
  for (size_t i = 1; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_same_device(op, name.c_str(), tensors[i], "tensors[0]", first);
    check_same_dtype(op, name.c_str(), tensors[i], "tensors[0]", first);
    ADAPTDIFF_CHECK(tensors[i].sizes() == first.sizes(), op, name, " must have shape ",
                    first.sizes(), ", got ", tensors[i].sizes());
  }
}

}  // namespace adaptdiff
