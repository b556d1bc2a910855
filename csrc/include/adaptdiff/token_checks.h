#pragma once
// Checks shared by the token ops (gather_tokens, scatter_tokens, indexed_linear_):
// x-like [B, N, D] data with an int64 [B, K] index on the same device.
#include "adaptdiff/checks.h"

namespace adaptdiff {

inline void check_token_index(const char* op, const at::Tensor& data, const char* data_name,
                              const at::Tensor& index) {
  check_dim(op, data_name, data, 3, "[B, N, D]");
  check_index(op, "index", index);
  check_dim(op, "index", index, 2, "[B, K]");
  check_same_device(op, "index", index, data_name, data);
  ADAPTDIFF_CHECK(index.size(0) == data.size(0), op, "index must have batch size ", data.size(0),
                  " (from ", data_name, "), got shape ", index.sizes());
}

inline void check_scatter_tokens_args(const at::Tensor& base, const at::Tensor& index,
                                      const at::Tensor& src) {
  constexpr const char* op = "scatter_tokens";
  check_floating(op, "base", base);
  check_token_index(op, base, "base", index);
  check_same_device(op, "src", src, "base", base);
  check_same_dtype(op, "src", src, "base", base);
  const int64_t B = base.size(0), K = index.size(1), D = base.size(2);
  ADAPTDIFF_CHECK(src.dim() == 3 && src.size(0) == B && src.size(1) == K && src.size(2) == D, op,
                  "src must have shape [B, K, D] = [", B, ", ", K, ", ", D, "], got ",
                  src.sizes());
}

// CPU only: every index in [0, n), and (when unique) no repeats within a batch row.
// index must be contiguous [B, K].
void check_index_values_cpu(const char* op, const at::Tensor& index, int64_t n, bool unique);

}  // namespace adaptdiff
