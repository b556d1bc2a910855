// sampled_wgrad on the GPU: a tiled grad_out^T x product that writes only the requested
// entries. The entries are bucketed by 64x64 output tile (a stable sort of their tile ids, then
// per-tile offsets); one thread block per tile accumulates its tile over N in shared memory
// tiles (float32, each thread a 4x4 patch), skips tiles with no entry, and writes its entries
// from the finished tile in shared memory. Dense dW never reaches device memory; every entry
// is summed in a fixed order (no atomics), so results are deterministic.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/sara_checks.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr int kTile = 64;     // output tile: kTile rows of O by kTile columns of I
constexpr int kDepth = 16;    // N rows per shared-memory step
constexpr int kThreads = 256; // 16 x 16 threads, each a 4 x 4 patch of the tile

__global__ void tile_ids_kernel(const int64_t* __restrict__ idx, int64_t* __restrict__ tile,
                                int64_t nnz, int64_t O, int64_t I, int64_t tiles_i) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < nnz;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t f = idx[k];
    CUDA_KERNEL_ASSERT(f >= 0 && f < O * I && "adaptdiff::sampled_wgrad: indices out of range");
    CUDA_KERNEL_ASSERT((k == 0 || idx[k - 1] < f) &&
                       "adaptdiff::sampled_wgrad: indices must be sorted and unique");
    tile[k] = (f / I / kTile) * tiles_i + (f % I) / kTile;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sampled_tile_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                        int64_t N, int64_t O, int64_t I, int64_t tiles_i,
                        const int64_t* __restrict__ offsets, const int64_t* __restrict__ order,
                        const int64_t* __restrict__ idx, scalar_t* __restrict__ g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tile = blockIdx.x;
  const int64_t k0 = offsets[tile], k1 = offsets[tile + 1];
  if (k0 == k1) return;  // no requested entry in this tile: nothing to compute
  const int64_t o0 = (tile / tiles_i) * kTile, i0 = (tile % tiles_i) * kTile;

  __shared__ acc_t sg[kDepth][kTile];
  __shared__ acc_t sx[kDepth][kTile];
  __shared__ acc_t result[kTile][kTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4] = {};
  for (int64_t n0 = 0; n0 < N; n0 += kDepth) {
    for (int e = threadIdx.x; e < kDepth * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t n = n0 + r, o = o0 + c, i = i0 + c;
      sg[r][c] = (n < N && o < O) ? static_cast<acc_t>(go[n * O + o]) : acc_t(0);
      sx[r][c] = (n < N && i < I) ? static_cast<acc_t>(x[n * I + i]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kDepth; ++r) {
      acc_t a[4], b[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        a[u] = sg[r][ty + 16 * u];  // strided patches: conflict-free shared-memory reads
        b[u] = sx[r][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] += a[u] * b[v];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int v = 0; v < 4; ++v) result[ty + 16 * u][tx + 16 * v] = acc[u][v];
  }
  __syncthreads();
  for (int64_t k = k0 + threadIdx.x; k < k1; k += kThreads) {
    const int64_t j = order[k], f = idx[j];
    g[j] = static_cast<scalar_t>(result[f / I - o0][f % I - i0]);
  }
}

}  // namespace

at::Tensor sampled_wgrad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& indices) {
  check_sampled_wgrad_args(grad_out, x, indices);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t N = x.size(0), O = grad_out.size(1), I = x.size(1), nnz = indices.numel();
  if (nnz == 0) return at::empty({0}, grad_out.options());
  if (N == 0) return at::zeros({nnz}, grad_out.options());

  const auto go = grad_out.contiguous(), xc = x.contiguous(), ic = indices.contiguous();
  const int64_t tiles_o = (O + kTile - 1) / kTile, tiles_i = (I + kTile - 1) / kTile;
  const int64_t tiles = tiles_o * tiles_i;
  auto tile_of = at::empty({nnz}, ic.options());
  tile_ids_kernel<<<cuda::blocks_for(nnz, 256), 256, 0, cuda::stream()>>>(
      ic.const_data_ptr<int64_t>(), tile_of.mutable_data_ptr<int64_t>(), nnz, O, I, tiles_i);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Per-tile index lists: entries ordered by tile, offsets[t] = first entry of tile t.
  // The optional<bool> is spelled out: a plain `true` picks the sort(self, dim, descending)
  // overload (bool -> int64_t beats bool -> optional<bool>) and sorts along dim 1.
  const auto [sorted_tiles, order] =
      at::sort(tile_of, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const auto offsets = at::searchsorted(sorted_tiles, at::arange(tiles + 1, ic.options()));

  auto g = at::empty({nnz}, grad_out.options());
#define SAMPLED_TILE_LAUNCH                                                                     \
  [&] {                                                                                         \
    sampled_tile_kernel<scalar_t><<<static_cast<unsigned>(tiles), kThreads, 0, cuda::stream()>>>( \
        go.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), N, O, I, tiles_i,         \
        offsets.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),                     \
        ic.const_data_ptr<int64_t>(), g.mutable_data_ptr<scalar_t>());                          \
  }
  // float64 is CPU-only (checked above); it would not fit the shared-memory tiles.
  AT_DISPATCH_SWITCH(go.scalar_type(), "sampled_wgrad_cuda",
                     AT_DISPATCH_CASE(at::ScalarType::Float, SAMPLED_TILE_LAUNCH)
                     AT_DISPATCH_CASE(at::ScalarType::Half, SAMPLED_TILE_LAUNCH)
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, SAMPLED_TILE_LAUNCH));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}
#undef SAMPLED_TILE_LAUNCH


}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("sampled_wgrad", &adaptdiff::sampled_wgrad_cuda);
}
