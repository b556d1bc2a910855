// moe_permute on the GPU: a counting sort with no host synchronisation (P is static).
// 1. count: one warp per tile of kTile assignments counts its experts into its own column
//    counts[e][tile] (lanes of a round that share an expert are grouped by __match_any_sync;
//    the group's leader adds its size: no atomics, the column has one writer);
// 2. scan (one block): per expert, an exclusive scan over tiles gives each tile its first row
//    within the expert's group; the totals, rounded up to align, scanned over experts give
//    offsets; pad rows of sorted_src get -1;
// 3. place: each warp walks its tile again in order, an assignment's row being its tile's
//    cursor plus the number of lower lanes with the same expert: ties keep assignment order;
// 4. the rows of x_sorted are gathered in output order (pad rows zero).
// An expert outside [0, E) trips a device-side assert; the CPU kernel raises instead.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "adaptdiff/moe_checks.h"
#include "adaptdiff/ops.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRounds = 8;              // rounds of 32 assignments per tile
constexpr int kTile = 32 * kRounds;     // assignments per warp
constexpr int kWarpsPerBlock = 4;       // count and place kernels
constexpr int kScanThreads = 1024;      // the scan kernel's single block: 32 warps
constexpr int kScanItems = 4;           // tiles per lane per step of the per-expert scan

__device__ __forceinline__ int64_t warp_inclusive_sum(int64_t v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t n = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += n;
  }
  return v;
}

// The experts of one tile round by round, -1 past the end (and, should asserts be compiled
// out, for an out-of-range value, so nothing is written out of bounds).
template <typename index_t>
__device__ __forceinline__ void load_tile(const index_t* __restrict__ experts, int64_t first,
                                          int64_t N, int64_t E, int lane, int64_t (&e)[kRounds]) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int64_t a = first + r * 32 + lane;
    int64_t v = -1;
    if (a < N) {
      v = static_cast<int64_t>(experts[a]);
      CUDA_KERNEL_ASSERT(v >= 0 && v < E && "adaptdiff::moe_permute: experts out of range");
      if (v < 0 || v >= E) v = -1;
    }
    e[r] = v;
  }
}

template <typename index_t>
__global__ void count_kernel(const index_t* __restrict__ experts, int64_t N, int64_t E,
                             int64_t tiles, int64_t* __restrict__ counts) {
  const int lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       tile < tiles;
       tile += step) {  // uniform over the warp
    int64_t e[kRounds];
    load_tile(experts, tile * kTile, N, E, lane, e);
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const unsigned group = __match_any_sync(kFullMask, static_cast<unsigned long long>(e[r]));
      if (e[r] >= 0 && lane == __ffs(group) - 1) counts[e[r] * tiles + tile] += __popc(group);
      __syncwarp();
    }
  }
}

// counts [E][tiles] -> each tile's first row within its expert's group; totals [E];
// offsets [E + 1]; sorted_src = -1 on every pad row.
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int64_t* __restrict__ counts, int64_t tiles, int64_t E, int64_t align, int64_t P,
                int64_t* __restrict__ totals, int64_t* __restrict__ offsets,
                int64_t* __restrict__ sorted_src) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Per expert, a warp scans over the tiles, kScanItems consecutive tiles per lane per step.
  for (int64_t e = warp; e < E; e += kScanThreads / 32) {
    int64_t* col = counts + e * tiles;
    int64_t carry = 0;
    for (int64_t base = 0; base < tiles; base += 32 * kScanItems) {
      int64_t v[kScanItems], sum = 0;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        const int64_t k = base + lane * kScanItems + i;
        v[i] = k < tiles ? col[k] : 0;
        sum += v[i];
      }
      const int64_t incl = warp_inclusive_sum(sum, lane);
      int64_t run = carry + incl - sum;
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        const int64_t k = base + lane * kScanItems + i;
        if (k < tiles) col[k] = run;
        run += v[i];
      }
      carry += __shfl_sync(kFullMask, incl, 31);
    }
    if (lane == 0) totals[e] = carry;
  }
  __syncthreads();

  // offsets: an exclusive block scan of the padded totals, kScanThreads experts at a time.
  __shared__ int64_t warp_sums[32];
  __shared__ int64_t chunk_total;
  int64_t carry = 0;
  for (int64_t first = 0; first < E; first += kScanThreads) {
    const int64_t e = first + threadIdx.x;
    const int64_t padded = e < E ? (totals[e] + align - 1) / align * align : 0;
    const int64_t incl = warp_inclusive_sum(padded, lane);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int64_t s = warp_sums[lane];
      const int64_t s_incl = warp_inclusive_sum(s, lane);
      warp_sums[lane] = s_incl - s;
      if (lane == 31) chunk_total = s_incl;
    }
    __syncthreads();
    if (e < E) offsets[e] = carry + warp_sums[warp] + incl - padded;
    carry += chunk_total;
    __syncthreads();  // warp_sums and chunk_total are rewritten by the next chunk
  }
  if (threadIdx.x == 0) offsets[E] = carry;
  __syncthreads();

  // Pad rows: each group's tail, then everything past offsets[E].
  for (int64_t e = threadIdx.x; e < E; e += kScanThreads) {
    for (int64_t r = offsets[e] + totals[e]; r < offsets[e + 1]; ++r) sorted_src[r] = -1;
  }
  for (int64_t r = carry + threadIdx.x; r < P; r += kScanThreads) sorted_src[r] = -1;
}

// cursor [E][tiles]: the scan's first rows, advanced as the warp places its tile.
template <typename index_t>
__global__ void place_kernel(const index_t* __restrict__ experts, int64_t N, int64_t E,
                             int64_t tiles, int64_t* __restrict__ cursor,
                             const int64_t* __restrict__ offsets,
                             int64_t* __restrict__ sorted_src) {
  const int lane = threadIdx.x % 32;
  const unsigned lower = (1u << lane) - 1u;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       tile < tiles;
       tile += step) {
    int64_t e[kRounds];
    load_tile(experts, tile * kTile, N, E, lane, e);
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const unsigned group = __match_any_sync(kFullMask, static_cast<unsigned long long>(e[r]));
      int64_t* slot = e[r] >= 0 ? cursor + e[r] * tiles + tile : nullptr;
      if (slot != nullptr) {
        sorted_src[offsets[e[r]] + *slot + __popc(group & lower)] = tile * kTile + r * 32 + lane;
      }
      __syncwarp();  // every lane has read the cursor before the leader moves it
      if (slot != nullptr && lane == __ffs(group) - 1) *slot += __popc(group);
      __syncwarp();
    }
  }
}

template <int W>
__global__ void gather_sorted_rows_kernel(const char* __restrict__ x, char* __restrict__ dst,
                                          const int64_t* __restrict__ sorted_src, int64_t P,
                                          int64_t K, int64_t row_bytes) {
  using V = typename cuda::VecOf<W>::type;
  const int64_t vecs = row_bytes / W;
  for (int64_t r = blockIdx.x; r < P; r += gridDim.x) {
    const int64_t a = sorted_src[r];
    V* d = reinterpret_cast<V*>(dst + r * row_bytes);
    if (a < 0) {
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) d[v] = V{};
    } else {
      const V* s = reinterpret_cast<const V*>(x + (a / K) * row_bytes);
      for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) d[v] = s[v];
    }
  }
}

template <typename index_t>
void sort_assignments(const at::Tensor& experts, int64_t N, int64_t E, int64_t align, int64_t P,
                      at::Tensor& sorted_src, at::Tensor& offsets) {
  const int64_t tiles = (N + kTile - 1) / kTile;
  // counts (then cursors) [E][tiles], then totals [E].
  auto scratch = at::zeros({E * tiles + E}, offsets.options());
  int64_t* counts = scratch.mutable_data_ptr<int64_t>();
  const index_t* ex = experts.const_data_ptr<index_t>();
  const unsigned grid = cuda::blocks_for(tiles, kWarpsPerBlock);
  constexpr int threads = 32 * kWarpsPerBlock;
  if (tiles > 0) {
    count_kernel<index_t><<<grid, threads, 0, cuda::stream()>>>(ex, N, E, tiles, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_kernel<<<1, kScanThreads, 0, cuda::stream()>>>(
      counts, tiles, E, align, P, counts + E * tiles, offsets.mutable_data_ptr<int64_t>(),
      sorted_src.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tiles > 0) {
    place_kernel<index_t><<<grid, threads, 0, cuda::stream()>>>(
        ex, N, E, tiles, counts, offsets.const_data_ptr<int64_t>(),
        sorted_src.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x,
                                                                const at::Tensor& experts,
                                                                int64_t num_experts,
                                                                int64_t align) {
  check_moe_permute(x, experts, num_experts, align);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), K = experts.size(1), N = T * K, E = num_experts;
  const int64_t P = moe_permuted_rows(N, E, align);
  auto x_sorted = at::empty({P, D}, x.options());
  auto sorted_src = at::empty({P}, x.options().dtype(at::kLong));
  auto offsets = at::empty({E + 1}, x.options().dtype(at::kLong));

  const auto ec = experts.contiguous();
  if (ec.scalar_type() == at::kInt) {
    sort_assignments<int32_t>(ec, N, E, align, P, sorted_src, offsets);
  } else {
    sort_assignments<int64_t>(ec, N, E, align, P, sorted_src, offsets);
  }
  if (x_sorted.numel() == 0) return {x_sorted, sorted_src, offsets};

  const auto xc = x.contiguous();
  const int64_t row_bytes = D * x.element_size();
  const int w = cuda::copy_width(xc.const_data_ptr(), x_sorted.const_data_ptr(), row_bytes);
  const int threads =
      static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, row_bytes / w)));
  cuda::with_copy_width(w, [&]<int W>() {
    gather_sorted_rows_kernel<W><<<cuda::blocks_for(P, 1), threads, 0, cuda::stream()>>>(
        static_cast<const char*>(xc.const_data_ptr()),
        static_cast<char*>(x_sorted.mutable_data_ptr()), sorted_src.const_data_ptr<int64_t>(), P,
        K, row_bytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_sorted, sorted_src, offsets};
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("moe_permute", &adaptdiff::moe_permute_cuda); }
