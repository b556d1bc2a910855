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

// CPU only: every index in [0, n), and (when unique) no repeats within a batch row.
// index must be contiguous [B, K].
void check_index_values_cpu(const char* op, const at::Tensor& index, int64_t n, bool unique);

}  // namespace adaptdiff
