#pragma once
// Argument checks of moe_permute and moe_unpermute, shared by the CPU and CUDA kernels (the
// fakes in python/adaptdiff/ops/moe_*.py say the same). Value checks (experts in range,
// sorted_src a valid permutation) happen in the kernels: errors on the CPU, asserts on the GPU.
#include "adaptdiff/checks.h"

namespace adaptdiff {

// The static row count of moe_permute's output (reference.moe_permuted_rows).
inline int64_t moe_permuted_rows(int64_t assignments, int64_t num_experts, int64_t align) {
  return assignments + (align > 1 ? num_experts * (align - 1) : 0);
}

inline void check_moe_permute(const at::Tensor& x, const at::Tensor& experts,
                              int64_t num_experts, int64_t align) {
  constexpr const char* op = "moe_permute";
  check_floating(op, "x", x);
  check_dim(op, "x", x, 2, "[T, D]");
  const auto it = experts.scalar_type();
  ADAPTDIFF_CHECK(it == at::kInt || it == at::kLong, op, "experts must be int32 or int64, got ",
                  dtype_name(it));
  check_same_device(op, "experts", experts, "x", x);
  ADAPTDIFF_CHECK(experts.dim() == 2 && experts.size(0) == x.size(0), op,
                  "experts must have shape [T, K] with T=", x.size(0), ", got ", experts.sizes());
  ADAPTDIFF_CHECK(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  ADAPTDIFF_CHECK(align >= 1, op, "align must be >= 1, got ", align);
}

inline void check_moe_unpermute(const at::Tensor& y_sorted, const at::Tensor& sorted_src,
                                const at::Tensor& weights) {
  constexpr const char* op = "moe_unpermute";
  check_floating(op, "y_sorted", y_sorted);
  check_floating(op, "weights", weights);
  check_dim(op, "y_sorted", y_sorted, 2, "[P, D]");
  check_index(op, "sorted_src", sorted_src);
  ADAPTDIFF_CHECK(sorted_src.dim() == 1 && sorted_src.size(0) == y_sorted.size(0), op,
                  "sorted_src must have shape [P] = [", y_sorted.size(0), "], got ",
                  sorted_src.sizes());
  check_dim(op, "weights", weights, 2, "[T, K]");
  ADAPTDIFF_CHECK(weights.size(0) * weights.size(1) <= y_sorted.size(0), op, "weights [T, K] = ",
                  weights.sizes(), " has more assignments than y_sorted has rows (",
                  y_sorted.size(0), ")");
  check_same_device(op, "sorted_src", sorted_src, "y_sorted", y_sorted);
  check_same_device(op, "weights", weights, "y_sorted", y_sorted);
}

}  // namespace adaptdiff
