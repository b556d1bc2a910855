#pragma once
// Row scatter shared by scatter_tokens and indexed_linear_: dst[b, index[b, i]] = src[b * K + i],
// one thread block per row, vectorised copies. Each op passes a Checks type whose device-side
// asserts carry its own name: an index out of [0, N), or one that repeats within a batch row
// (found with a zeroed int32 [B, N] counter and atomicAdd), traps as torch's index kernels do.
#include <ATen/ops/zeros.h>

#include "common.cuh"

namespace adaptdiff::cuda {

template <int W, typename Checks>
__global__ void scatter_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                    const int64_t* __restrict__ idx, int* __restrict__ hits,
                                    int64_t rows, int64_t K, int64_t N, int64_t row_bytes) {
  using V = typename VecOf<W>::type;
  const int64_t vecs = row_bytes / W;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = idx[r];
    Checks::in_range(i >= 0 && i < N);  // every thread, so none writes out of bounds
    const int64_t t = (r / K) * N + i;
    if (threadIdx.x == 0) Checks::unique(atomicAdd(hits + t, 1) == 0);
    const V* s = reinterpret_cast<const V*>(src + r * row_bytes);
    V* d = reinterpret_cast<V*>(dst + t * row_bytes);
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) d[v] = s[v];
  }
}

// src: contiguous [B * K, row_bytes]; dst: contiguous [B, N, row_bytes]; index: contiguous [B, K].
template <typename Checks>
void scatter_rows(const void* src, void* dst, const at::Tensor& index, int64_t N,
                  int64_t row_bytes) {
  const int64_t B = index.size(0), K = index.size(1);
  if (B * K == 0 || row_bytes == 0) return;
  auto hits = at::zeros({B, N}, index.options().dtype(at::kInt));
  const int w = copy_width(src, dst, row_bytes);
  const int threads =
      static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, row_bytes / w)));
  with_copy_width(w, [&]<int W>() {
    scatter_rows_kernel<W, Checks><<<blocks_for(B * K, 1), threads, 0, stream()>>>(
        static_cast<const char*>(src), static_cast<char*>(dst), index.const_data_ptr<int64_t>(),
        hits.mutable_data_ptr<int>(), B * K, K, N, row_bytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace adaptdiff::cuda
