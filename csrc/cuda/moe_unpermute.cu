// moe_unpermute on the GPU: a scatter kernel builds the inverse map row_of[a] (the row of
// y_sorted holding assignment a), then one thread block per token sums its K rows in slot
// order in float32, products and sums rounded separately (no FMA contraction), as
// reference.moe_unpermute does: deterministic, no float atomics. An entry of sorted_src out of
// [-1, T*K), an assignment held twice (an integer atomicCAS finds it) or one missing trips a
// device-side assert; the CPU kernel raises instead.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/moe_checks.h"
#include "adaptdiff/ops.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr int kMapThreads = 256;

// row_of: N entries, all bits set (-1) on entry.
__global__ void inverse_map_kernel(const int64_t* __restrict__ sorted_src, int64_t P, int64_t N,
                                   unsigned long long* __restrict__ row_of) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < P;
       r += stride) {
    const int64_t a = sorted_src[r];
    if (a == -1) continue;
    CUDA_KERNEL_ASSERT(a >= 0 && a < N && "adaptdiff::moe_unpermute: sorted_src out of range");
    if (a < 0 || a >= N) continue;
    const unsigned long long prev =
        atomicCAS(row_of + a, ~0ull, static_cast<unsigned long long>(r));
    CUDA_KERNEL_ASSERT(prev == ~0ull &&
                       "adaptdiff::moe_unpermute: sorted_src holds an assignment twice");
  }
}

template <typename scalar_t>
__global__ void combine_kernel(const scalar_t* __restrict__ y_sorted,
                               const int64_t* __restrict__ row_of, const float* __restrict__ w,
                               int64_t T, int64_t K, int64_t D, scalar_t* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = row_of[t * K + j];
        CUDA_KERNEL_ASSERT(r >= 0 && "adaptdiff::moe_unpermute: sorted_src misses an assignment");
        if (r < 0) continue;
        const float v = static_cast<float>(y_sorted[r * D + d]);
        acc = __fadd_rn(acc, __fmul_rn(w[t * K + j], v));
      }
      out[t * D + d] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace

at::Tensor moe_unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& sorted_src,
                              const at::Tensor& weights) {
  check_moe_unpermute(y_sorted, sorted_src, weights);
  c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t P = y_sorted.size(0), D = y_sorted.size(1);
  const int64_t T = weights.size(0), K = weights.size(1), N = T * K;
  const auto sc = sorted_src.contiguous();
  auto row_of = at::full({N}, -1, sc.options());
  if (P > 0 && N > 0) {
    inverse_map_kernel<<<cuda::blocks_for(P, kMapThreads), kMapThreads, 0, cuda::stream()>>>(
        sc.const_data_ptr<int64_t>(), P, N,
        reinterpret_cast<unsigned long long*>(row_of.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  auto y = at::empty({T, D}, y_sorted.options());
  if (y.numel() == 0) return y;
  const auto yc = y_sorted.contiguous();
  const auto wc = weights.to(at::kFloat).contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(256, (D + 31) / 32 * 32));
  ADAPTDIFF_DISPATCH_FLOATING(y.scalar_type(), "moe_unpermute", [&] {
    combine_kernel<scalar_t><<<cuda::blocks_for(T, 1), threads, 0, cuda::stream()>>>(
        yc.const_data_ptr<scalar_t>(), row_of.const_data_ptr<int64_t>(),
        wc.const_data_ptr<float>(), T, K, D, y.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("moe_unpermute", &adaptdiff::moe_unpermute_cuda);
}
