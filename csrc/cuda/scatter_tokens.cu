// scatter_tokens on the GPU: out = base (one strided copy, so a non-contiguous base costs no
// extra pass), then the K rows of src are written over it by the shared row-scatter kernel.
// Out-of-range or repeated indices trip a device-side assert; the CPU kernel raises instead.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "adaptdiff/token_checks.h"
#include "scatter_rows.cuh"

namespace adaptdiff {
namespace {

struct ScatterTokensChecks {
  static __device__ void in_range(bool ok) {
    CUDA_KERNEL_ASSERT(ok && "adaptdiff::scatter_tokens: index out of range");
  }
  static __device__ void unique(bool ok) {
    CUDA_KERNEL_ASSERT(ok && "adaptdiff::scatter_tokens: index must be unique per row");
  }
};

}  // namespace

at::Tensor scatter_tokens_cuda(const at::Tensor& base, const at::Tensor& index,
                               const at::Tensor& src) {
  check_scatter_tokens_args(base, index, src);
  const int64_t B = base.size(0), N = base.size(1), D = base.size(2), K = index.size(1);
  c10::cuda::CUDAGuard guard(base.device());
  auto out = at::empty({B, N, D}, base.options());
  if (out.numel() == 0) return out;
  out.copy_(base);
  const auto sc = src.contiguous();
  cuda::scatter_rows<ScatterTokensChecks>(sc.const_data_ptr(), out.mutable_data_ptr(),
                                          index.contiguous(), N, D * base.element_size());
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("scatter_tokens", &adaptdiff::scatter_tokens_cuda);
}
