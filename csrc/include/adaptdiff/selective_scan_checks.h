#pragma once
// Checks of selective_scan and its backward (CPU and CUDA): u, delta, z [B, D, L] and
// B, C [B, N, L] of one floating dtype; A [D, N], D_skip [D] and delta_bias [D] float32 or the
// dtype of u. Every message names the op and the argument.
#include <optional>
#include <utility>

#include "adaptdiff/checks.h"

namespace adaptdiff {

// float32 (Mamba keeps these parameters in float32) or the dtype of u.
inline void check_param_dtype(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& u) {
  const auto s = t.scalar_type();
  ADAPTDIFF_CHECK(s == at::kFloat || s == u.scalar_type(), op, name,
                  " must be float32 or the dtype of u (", dtype_name(u.scalar_type()), "), got ",
                  dtype_name(s));
}

inline void check_selective_scan_args(const char* op, const at::Tensor& u, const at::Tensor& delta,
                                      const at::Tensor& A, const at::Tensor& B,
                                      const at::Tensor& C,
                                      const std::optional<at::Tensor>& D_skip,
                                      const std::optional<at::Tensor>& z,
                                      const std::optional<at::Tensor>& delta_bias) {
  check_floating(op, "u", u);
  check_dim(op, "u", u, 3, "[B, D, L]");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  check_same_device(op, "delta", delta, "u", u);
  check_same_dtype(op, "delta", delta, "u", u);
  ADAPTDIFF_CHECK(delta.sizes() == u.sizes(), op, "delta must have the shape of u (", u.sizes(),
                  "), got ", delta.sizes());
  check_same_device(op, "A", A, "u", u);
  check_param_dtype(op, "A", A, u);
  check_dim(op, "A", A, 2, "[D, N]");
  ADAPTDIFF_CHECK(A.size(0) == dim, op, "A must have shape [D, N] with D = ", dim,
                  " (from u), got ", A.sizes());
  const int64_t n = A.size(1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"B", B}, {"C", C}}) {
    check_same_device(op, name, t, "u", u);
    check_same_dtype(op, name, t, "u", u);
    ADAPTDIFF_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == n && t.size(2) == len, op,
                    name, " must have shape [B, N, L] = [", batch, ", ", n, ", ", len,
                    "] (B, L from u, N from A), got ", t.sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>&>{
                                    "D_skip", D_skip},
                                {"delta_bias", delta_bias}}) {
    if (!t) continue;
    check_same_device(op, name, *t, "u", u);
    check_param_dtype(op, name, *t, u);
    ADAPTDIFF_CHECK(t->dim() == 1 && t->size(0) == dim, op, name, " must have shape [D] = [",
                    dim, "], got ", t->sizes());
  }
  if (z) {
    check_same_device(op, "z", *z, "u", u);
    check_same_dtype(op, "z", *z, "u", u);
    ADAPTDIFF_CHECK(z->sizes() == u.sizes(), op, "z must have the shape of u (", u.sizes(),
                    "), got ", z->sizes());
  }
}

inline void check_selective_scan_backward_args(
    const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias) {
  constexpr const char* op = "selective_scan_backward";
  check_selective_scan_args(op, u, delta, A, B, C, D_skip, z, delta_bias);
  check_same_device(op, "grad_out", grad_out, "u", u);
  check_same_dtype(op, "grad_out", grad_out, "u", u);
  ADAPTDIFF_CHECK(grad_out.sizes() == u.sizes(), op, "grad_out must have the shape of u (",
                  u.sizes(), "), got ", grad_out.sizes());
}

}  // namespace adaptdiff
