#pragma once
// CUDA driver of the per-sample pair reductions (rel_l1, cosine); the arithmetic is in
// adaptdiff/pair_reduction.h.
//
// Deterministic two-stage reduction, no atomics: stage 1 gives every fixed-size chunk of a
// sample one block, which sums its K terms in float32 (16-byte loads when aligned) and writes
// them to a scratch tensor; stage 2 adds a sample's chunk partials in double in a fixed tree
// order and applies Terms::finish. The chunk size is a constant, so results do not depend on
// the GPU model either.
#include <ATen/ops/empty.h>

#include <cstdint>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/pair_reduction.h"
#include "common.cuh"

namespace adaptdiff::cuda {

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceChunk = 8192;  // elements behind one block partial

template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

// Sums s[k] over the block in a fixed order; the result is valid in thread 0.
template <int K, typename T>
__device__ void block_sum(T (&s)[K]) {
  __shared__ T warp_sums[K][kReduceThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int off = 16; off > 0; off >>= 1) s[k] += __shfl_down_sync(0xffffffffu, s[k], off);
    if (lane == 0) warp_sums[k][warp] = s[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      s[k] = lane < kReduceThreads / 32 ? warp_sums[k][lane] : T(0);
      for (int off = 16; off > 0; off >>= 1) s[k] += __shfl_down_sync(0xffffffffu, s[k], off);
    }
  }
}

// Block t handles chunk t % chunks of sample t / chunks. kVec: every chunk's start is 16-byte
// aligned and its length a multiple of the pack size (checked by the launcher).
template <typename Terms, typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kReduceThreads)
    pair_partials_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                         int64_t n, int64_t chunks, float* __restrict__ partial) {
  constexpr int K = Terms::K;
  const int64_t task = blockIdx.x;
  const int64_t chunk = task % chunks;
  const int64_t first = (task / chunks) * n + chunk * kReduceChunk;
  const int64_t len = n - chunk * kReduceChunk < kReduceChunk ? n - chunk * kReduceChunk
                                                               : kReduceChunk;
  float s[K] = {};
  if constexpr (kVec) {
    using P = Pack16<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const P* pa = reinterpret_cast<const P*>(a + first);
    const P* pb = reinterpret_cast<const P*>(b + first);
    for (int64_t i = threadIdx.x; i < len / V; i += kReduceThreads) {
      const P x = pa[i], y = pb[i];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        Terms::add(s, 1, static_cast<float>(x.v[v]), static_cast<float>(y.v[v]));
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kReduceThreads) {
      Terms::add(s, 1, static_cast<float>(a[first + i]), static_cast<float>(b[first + i]));
    }
  }
  block_sum(s);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partial[task * K + k] = s[k];
  }
}

// One block per sample: its chunk partials summed in double, then Terms::finish.
template <typename Terms>
__global__ void __launch_bounds__(kReduceThreads)
    pair_finish_kernel(const float* __restrict__ partial, int64_t chunks, float* __restrict__ out) {
  constexpr int K = Terms::K;
  const float* p = partial + static_cast<int64_t>(blockIdx.x) * chunks * K;
  double s[K] = {};
  for (int64_t c = threadIdx.x; c < chunks; c += kReduceThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += p[c * K + k];
  }
  block_sum(s);
  if (threadIdx.x == 0) out[blockIdx.x] = Terms::finish(s);
}

template <typename Terms>
at::Tensor pair_reduce_cuda(const at::Tensor& a, const at::Tensor& b) {
  constexpr int K = Terms::K;
  constexpr const char* op = Terms::kOp;
  check_pair_reduction(op, a, b);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options().dtype(at::kFloat));
  if (B == 0) return out;
  const auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t n = a.numel() / B;
  const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
  ADAPTDIFF_CHECK(B * chunks <= INT32_MAX && B <= INT32_MAX, op, "a is too large (shape ",
                  a.sizes(), ") for one launch");
  auto partial = at::empty({B * chunks * K}, a.options().dtype(at::kFloat));
  if (chunks > 0) {
    ADAPTDIFF_DISPATCH_FLOATING(a.scalar_type(), op, [&] {
      const scalar_t* pa = ac.const_data_ptr<scalar_t>();
      const scalar_t* pb = bc.const_data_ptr<scalar_t>();
      const bool vec = reinterpret_cast<std::uintptr_t>(pa) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(pb) % 16 == 0 &&
                       (n * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
      const auto grid = static_cast<unsigned>(B * chunks);
      float* pp = partial.mutable_data_ptr<float>();
      if (vec) {
        pair_partials_kernel<Terms, scalar_t, true>
            <<<grid, kReduceThreads, 0, stream()>>>(pa, pb, n, chunks, pp);
      } else {
        pair_partials_kernel<Terms, scalar_t, false>
            <<<grid, kReduceThreads, 0, stream()>>>(pa, pb, n, chunks, pp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  pair_finish_kernel<Terms><<<static_cast<unsigned>(B), kReduceThreads, 0, stream()>>>(
      partial.const_data_ptr<float>(), chunks, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace adaptdiff::cuda
