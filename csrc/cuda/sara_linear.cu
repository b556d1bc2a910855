// sara_linear on the GPU: a transient copy of the weight with the values written in (one
// scatter kernel), then one cuBLAS GEMM through the dispatcher. The copy lives only for the
// call; the backward's input gradient calls this op on weight.t(), which the copy lays out.
// Out-of-range or unsorted indices trip a device-side assert; the CPU kernel raises instead.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/sara_checks.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

template <typename scalar_t>
__global__ void scatter_values_kernel(scalar_t* __restrict__ w, const int64_t* __restrict__ idx,
                                      const scalar_t* __restrict__ vals, int64_t nnz,
                                      int64_t numel) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < nnz;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx[k];
    CUDA_KERNEL_ASSERT(i >= 0 && i < numel && "adaptdiff::sara_linear: indices out of range");
    CUDA_KERNEL_ASSERT((k == 0 || idx[k - 1] < i) &&
                       "adaptdiff::sara_linear: indices must be sorted and unique");
    w[i] = vals[k];
  }
}

}  // namespace

at::Tensor sara_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& indices,
                            const at::Tensor& values) {
  check_sara_linear_args(x, weight, bias, indices, values);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t O = weight.size(0), I = weight.size(1), nnz = indices.numel();
  auto out_shape = x.sizes().vec();
  out_shape.back() = O;
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const auto x2 = x.reshape({N, I});
  if (N == 0 || O == 0) return at::empty(out_shape, x.options());

  auto w = at::empty({O, I}, weight.options());
  w.copy_(weight);
  if (nnz > 0) {
    const auto ic = indices.contiguous();
    const auto vc = values.contiguous();
    ADAPTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sara_linear_cuda", [&] {
      scatter_values_kernel<scalar_t><<<cuda::blocks_for(nnz, 256), 256, 0, cuda::stream()>>>(
          w.mutable_data_ptr<scalar_t>(), ic.const_data_ptr<int64_t>(),
          vc.const_data_ptr<scalar_t>(), nnz, O * I);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto y = bias ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  return y.view(out_shape);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("sara_linear", &adaptdiff::sara_linear_cuda); }
