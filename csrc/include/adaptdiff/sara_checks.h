#pragma once
// Checks shared by the SaRA ops (sara_linear, sampled_wgrad): a frozen [O, I] matrix addressed
// by sorted, unique int64 flat row-major indices.
#include <optional>

#include "adaptdiff/checks.h"

namespace adaptdiff {

inline void check_flat_indices(const char* op, const at::Tensor& indices, const at::Tensor& ref,
                               const char* ref_name) {
  check_index(op, "indices", indices);
  check_dim(op, "indices", indices, 1, "[nnz]");
  check_same_device(op, "indices", indices, ref_name, ref);
}

inline void check_sara_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const at::Tensor& indices, const at::Tensor& values) {
  constexpr const char* op = "sara_linear";
  check_floating(op, "x", x);
  ADAPTDIFF_CHECK(x.dim() >= 1, op, "x must be [..., I] with at least 1 dimension, got shape ",
                  x.sizes());
  check_dim(op, "weight", weight, 2, "[O, I]");
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  ADAPTDIFF_CHECK(weight.size(1) == x.size(-1), op, "weight must have shape [O, I] with I = ",
                  x.size(-1), " (the last dimension of x), got ", weight.sizes());
  if (bias) {
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "x", x);
    ADAPTDIFF_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                    "bias must have shape [O] = [", weight.size(0), "], got ", bias->sizes());
  }
  check_flat_indices(op, indices, x, "x");
  check_same_device(op, "values", values, "x", x);
  check_same_dtype(op, "values", values, "x", x);
  ADAPTDIFF_CHECK(values.dim() == 1 && values.size(0) == indices.size(0), op,
                  "values must have shape [nnz] = [", indices.size(0), "] (from indices), got ",
                  values.sizes());
}

inline void check_sampled_wgrad_args(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& indices) {
  constexpr const char* op = "sampled_wgrad";
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 2, "[N, O]");
  check_dim(op, "x", x, 2, "[N, I]");
  check_same_device(op, "x", x, "grad_out", grad_out);
  check_same_dtype(op, "x", x, "grad_out", grad_out);
  ADAPTDIFF_CHECK(x.size(0) == grad_out.size(0), op, "x must have ", grad_out.size(0),
                  " rows (the N of grad_out), got shape ", x.sizes());
  check_flat_indices(op, indices, grad_out, "grad_out");
}

// CPU only: strictly increasing (sorted, unique) and inside [0, numel). indices contiguous.
inline void check_flat_index_values_cpu(const char* op, const at::Tensor& indices, int64_t numel,
                                        const char* matrix) {
  const int64_t n = indices.numel();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    ADAPTDIFF_CHECK(idx[k] >= 0 && idx[k] < numel, op, "indices out of range: indices[", k,
                    "] = ", idx[k], " but ", matrix, " has ", numel, " entries");
    ADAPTDIFF_CHECK(k == 0 || idx[k] > idx[k - 1], op,
                    "indices must be sorted and unique, but indices[", k, "] = ", idx[k],
                    " follows indices[", k - 1, "] = ", idx[k - 1]);
  }
}

}  // namespace adaptdiff
