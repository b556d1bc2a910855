// patch_scores on the GPU: one thread block per (sample, band of p rows). Each thread owns one
// column of the band: it walks the p rows and all C channels (consecutive threads read
// consecutive addresses), turns each pixel's channel sums into its std or L2 norm and adds the
// p pixels of its column in float32. A column sum goes to shared memory, and one thread per
// patch adds its p column sums in order: every sum has a fixed order, so results are
// deterministic. Stride-aware (int64 offsets), so views need no copy.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/patch_scores_checks.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr int kMaxThreads = 256;

struct Geometry {
  int64_t C, H, W, p;
  int64_t sB, sC, sH, sW;  // strides of v, in elements
};

// Sum over the p pixels of column w of one band of their per-pixel std (or L2 norm).
// The variance is taken around the first channel's value so a large mean does not cancel.
template <typename scalar_t, bool kStd>
__device__ float column_sum(const scalar_t* __restrict__ v, const Geometry& g, int64_t b,
                            int64_t h0, int64_t w) {
  const float inv_c = 1.0f / static_cast<float>(g.C);
  float col = 0.0f;
  for (int64_t r = 0; r < g.p; ++r) {
    const scalar_t* px = v + b * g.sB + (h0 + r) * g.sH + w * g.sW;
    const float shift = (kStd && g.C > 0) ? static_cast<float>(px[0]) : 0.0f;
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll 4
    for (int64_t c = 0; c < g.C; ++c) {
      const float d = static_cast<float>(px[c * g.sC]) - shift;
      s1 += d;
      s2 += d * d;
    }
    if constexpr (kStd) {
      const float mean = s1 * inv_c;
      const float var = s2 * inv_c - mean * mean;
      col += sqrtf(var < 0.0f ? 0.0f : var);  // keeps NaN (C == 0), as torch's std does
    } else {
      col += sqrtf(s2);
    }
  }
  return col;
}

// Patches of p <= blockDim: a tile of `tile` columns (a multiple of p) per step, one
// thread per column, then one thread per patch. Larger p: the block strides over each
// patch's columns and reduces in shared memory (blockDim is a power of two).
template <typename scalar_t, bool kStd>
__global__ void patch_scores_kernel(const scalar_t* __restrict__ v, float* __restrict__ out,
                                    Geometry g, int64_t bands_total) {
  __shared__ float col[kMaxThreads];
  const int64_t bands = g.H / g.p, cols = g.W / g.p;
  const int t = threadIdx.x, nt = blockDim.x;
  const float inv_area = 1.0f / static_cast<float>(g.p * g.p);
  for (int64_t task = blockIdx.x; task < bands_total; task += gridDim.x) {
    const int64_t b = task / bands, h0 = (task % bands) * g.p;
    float* orow = out + task * cols;  // task = b * bands + band: patches in row-major order
    if (g.p <= nt) {
      const int64_t tile = (nt / g.p) * g.p;
      for (int64_t w0 = 0; w0 < g.W; w0 += tile) {
        if (t < tile && w0 + t < g.W) col[t] = column_sum<scalar_t, kStd>(v, g, b, h0, w0 + t);
        __syncthreads();
        const int64_t j = w0 / g.p + t;
        if (t < tile / g.p && j < cols) {
          float sum = 0.0f;
          for (int64_t k = 0; k < g.p; ++k) sum += col[t * g.p + k];
          orow[j] = sum * inv_area;
        }
        __syncthreads();
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        float sum = 0.0f;
        for (int64_t k = t; k < g.p; k += nt) {
          sum += column_sum<scalar_t, kStd>(v, g, b, h0, j * g.p + k);
        }
        col[t] = sum;
        __syncthreads();
        for (int s = nt / 2; s > 0; s /= 2) {
          if (t < s) col[t] += col[t + s];
          __syncthreads();
        }
        if (t == 0) orow[j] = col[0] * inv_area;
        __syncthreads();
      }
    }
  }
}

int threads_for(int64_t W) {
  int n = 32;
  while (n < kMaxThreads && n < W) n *= 2;
  return n;
}

}  // namespace

at::Tensor patch_scores_cuda(const at::Tensor& v, int64_t patch, c10::string_view metric) {
  const bool is_std = check_patch_scores_args(v, patch, metric);
  c10::cuda::CUDAGuard guard(v.device());
  const int64_t B = v.size(0), H = v.size(2), W = v.size(3);
  auto out = at::empty({B, (H / patch) * (W / patch)}, v.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const Geometry g{v.size(1), H, W, patch, v.stride(0), v.stride(1), v.stride(2), v.stride(3)};
  const int64_t bands_total = B * (H / patch);
  const int threads = threads_for(W);
  const unsigned blocks = cuda::blocks_for(bands_total, 1);
  ADAPTDIFF_DISPATCH_FLOATING(v.scalar_type(), "patch_scores_cuda", [&] {
    const auto* vp = v.const_data_ptr<scalar_t>();
    float* op = out.mutable_data_ptr<float>();
    if (is_std) {
      patch_scores_kernel<scalar_t, true>
          <<<blocks, threads, 0, cuda::stream()>>>(vp, op, g, bands_total);
    } else {
      patch_scores_kernel<scalar_t, false>
          <<<blocks, threads, 0, cuda::stream()>>>(vp, op, g, bands_total);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("patch_scores", &adaptdiff::patch_scores_cuda); }
