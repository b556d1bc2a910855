// sara_linear: y = x W_eff^T + bias, W_eff = weight with W_eff.view(-1)[indices] = values.
// One transient copy of the weight, in the weight's own memory layout (so the backward's call
// on weight.t() is a plain memcpy, not a transposition), the values written into it through the
// strides, then one BLAS GEMM. The copy lives for this call only (it is not a gradient).
// Measured alternative: per-row-block scratch copies feeding one GEMM each kept the scratch in
// L2 but cost 1.25-1.5x the single GEMM at DiT-B shapes (narrow GEMMs, strided copies of
// weight.t()), so the whole-weight copy won.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/sara_checks.h"

namespace adaptdiff {
namespace {

constexpr const char* op = "sara_linear";

}  // namespace

at::Tensor sara_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& indices,
                           const at::Tensor& values) {
  check_sara_linear_args(x, weight, bias, indices, values);
  const int64_t O = weight.size(0), I = weight.size(1);
  const auto ic = indices.contiguous();
  check_flat_index_values_cpu(op, ic, O * I, "weight");

  auto out_shape = x.sizes().vec();
  out_shape.back() = O;
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const auto x2 = x.reshape({N, I});  // BLAS takes its strides
  auto y = at::empty({N, O}, x.options());
  if (N == 0 || O == 0) return y.view(out_shape);
  if (I == 0) {
    bias ? y.copy_(bias->unsqueeze(0).expand({N, O})) : y.zero_();
    return y.view(out_shape);
  }

  // Dense layouts (contiguous or transposed) are kept; anything else becomes contiguous.
  auto w = at::empty_like(weight, at::MemoryFormat::Preserve);
  w.copy_(weight);
  const auto vc = values.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t nnz = ic.numel(), s0 = w.stride(0), s1 = w.stride(1);
  ADAPTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sara_linear_cpu", [&] {
    const scalar_t* vals = vc.const_data_ptr<scalar_t>();
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < nnz; ++k) wp[(idx[k] / I) * s0 + (idx[k] % I) * s1] = vals[k];
  });
  if (bias) {
    at::addmm_out(y, *bias, x2, w.t());
  } else {
    at::mm_out(y, x2, w.t());
  }
  return y.view(out_shape);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("sara_linear", &adaptdiff::sara_linear_cpu); }
