// indexed_linear_ on the GPU: the [B*K, O] product by at::addmm (cuBLAS, through the
// dispatcher), then the shared row-scatter kernel writes its rows into out. Out-of-range or
// repeated indices trip a device-side assert; the CPU kernel raises instead.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "adaptdiff/indexed_linear_checks.h"
#include "adaptdiff/ops.h"
#include "scatter_rows.cuh"

namespace adaptdiff {
namespace {

struct IndexedLinearChecks {
  static __device__ void in_range(bool ok) {
    CUDA_KERNEL_ASSERT(ok && "adaptdiff::indexed_linear_: index out of range");
  }
  static __device__ void unique(bool ok) {
    CUDA_KERNEL_ASSERT(ok && "adaptdiff::indexed_linear_: index must be unique per row");
  }
};

}  // namespace

void indexed_linear__cuda(at::Tensor& out, const at::Tensor& index, const at::Tensor& x,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_indexed_linear_args(out, index, x, weight, bias);
  const int64_t B = out.size(0), N = out.size(1), O = out.size(2), K = index.size(1);
  if (B * K == 0 || O == 0) return;
  c10::cuda::CUDAGuard guard(out.device());
  const auto x2 = x.reshape({B * K, x.size(2)});
  const auto y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  cuda::scatter_rows<IndexedLinearChecks>(y.const_data_ptr(), out.mutable_data_ptr(),
                                          index.contiguous(), N, O * out.element_size());
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("indexed_linear_", &adaptdiff::indexed_linear__cuda);
}
