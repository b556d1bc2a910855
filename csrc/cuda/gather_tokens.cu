// gather_tokens on the GPU: one thread block per output row group, vectorised row copies.
// Out-of-range indices trip a device-side assert (as torch's own index kernels do); the CPU
// kernel raises a regular error instead.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "adaptdiff/token_checks.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

template <int W>
__global__ void gather_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                   const int64_t* __restrict__ idx, int64_t rows, int64_t K,
                                   int64_t N, int64_t row_bytes) {
  using V = typename cuda::VecOf<W>::type;
  const int64_t vecs = row_bytes / W;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = idx[r];
    CUDA_KERNEL_ASSERT(i >= 0 && i < N && "adaptdiff::gather_tokens: index out of range");
    const V* s = reinterpret_cast<const V*>(src + ((r / K) * N + i) * row_bytes);
    V* d = reinterpret_cast<V*>(dst + r * row_bytes);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) d[v] = s[v];
  }
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "gather_tokens";
  check_floating(op, "x", x);
  check_token_index(op, x, "x", index);
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto ic = index.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = index.size(1);
  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = D * x.element_size();
  const int w = cuda::copy_width(xc.const_data_ptr(), out.const_data_ptr(), row_bytes);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, row_bytes / w)));
  cuda::with_copy_width(w, [&]<int W>() {
    gather_rows_kernel<W><<<cuda::blocks_for(B * K, 1), threads, 0, cuda::stream()>>>(
        static_cast<const char*>(xc.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
        ic.const_data_ptr<int64_t>(), B * K, K, N, row_bytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("gather_tokens", &adaptdiff::gather_tokens_cuda); }
