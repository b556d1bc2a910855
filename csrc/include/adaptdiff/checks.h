#pragma once
// Argument checks shared by every kernel. Each message starts with "adaptdiff::<op>: " and
// names the argument, so eager, fake and compiled runs fail the same way.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

#define ADAPTDIFF_CHECK(cond, op, ...) TORCH_CHECK((cond), "adaptdiff::", op, ": ", __VA_ARGS__)

namespace adaptdiff {

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

// float32/float16/bfloat16 everywhere, float64 on the CPU (gradcheck).
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kHalf || s == at::kBFloat16 ||
                  (s == at::kDouble && t.device().is_cpu());
  ADAPTDIFF_CHECK(ok, op, name, " must be float32, float16 or bfloat16 (float64 on the CPU), got ",
                  dtype_name(s), " on ", t.device());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t) {
  ADAPTDIFF_CHECK(t.scalar_type() == at::kLong, op, name, " must be int64, got ",
                  dtype_name(t.scalar_type()));
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  ADAPTDIFF_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D ", layout, ", got shape ",
                  t.sizes());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  ADAPTDIFF_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ",
                  ref_name, " (", dtype_name(ref.scalar_type()), "), got ",
                  dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  ADAPTDIFF_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name,
                  " (", ref.device(), "), got ", t.device());
}

}  // namespace adaptdiff
