#pragma once
// Argument checks of patch_scores, shared by the CPU and CUDA kernels (the fake in
// python/adaptdiff/ops/patch_scores.py raises the same messages).
#include <c10/util/string_view.h>

#include "adaptdiff/checks.h"

namespace adaptdiff {

// Returns true for metric "std", false for "l2".
inline bool check_patch_scores_args(const at::Tensor& v, int64_t patch, c10::string_view metric) {
  constexpr const char* op = "patch_scores";
  check_floating(op, "v", v);
  check_dim(op, "v", v, 4, "[B, C, H, W]");
  ADAPTDIFF_CHECK(patch >= 1, op, "patch must be >= 1, got ", patch);
  ADAPTDIFF_CHECK(metric == "std" || metric == "l2", op, "metric must be 'std' or 'l2', got '",
                  std::string(metric), "'");
  ADAPTDIFF_CHECK(v.size(2) % patch == 0 && v.size(3) % patch == 0, op,
                  "v's H and W must be multiples of patch=", patch, ", got shape ", v.sizes());
  return metric == "std";
}

}  // namespace adaptdiff
