// lincomb on the GPU: sum_i coeffs[i] * tensors[i], elementwise, accumulated in float32.
// Up to kMaxTensors pointers travel by value in the kernel's argument struct; a longer list
// runs in batches of that many, carrying the float32 sum between batches in a scratch buffer
// (the output itself when it is float32), so half inputs are rounded only once, at the end.
// Products and sums are rounded separately (no FMA contraction), as in reference.lincomb.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/lincomb.h"
#include "adaptdiff/ops.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr int kMaxTensors = 8;
constexpr int kThreads = 256;

template <typename scalar_t>
struct Batch {
  const scalar_t* src[kMaxTensors];
  float coeff[kMaxTensors];
  int count;
};

// acc_in: the running sum (nullptr for the first batch); acc_out: where it goes next (nullptr
// for the last batch, which writes out). acc_in, acc_out and out may alias element for element.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lincomb_kernel(Batch<scalar_t> batch, const float* acc_in, float* acc_out, scalar_t* out,
                   int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float s = acc_in != nullptr ? acc_in[i] : 0.f;
#pragma unroll
    for (int t = 0; t < kMaxTensors; ++t) {
      if (t < batch.count) {
        s = __fadd_rn(s, __fmul_rn(batch.coeff[t], static_cast<float>(batch.src[t][i])));
      }
    }
    if (acc_out != nullptr) {
      acc_out[i] = s;
    } else {
      out[i] = static_cast<scalar_t>(s);
    }
  }
}

}  // namespace

at::Tensor lincomb_cuda(at::TensorList tensors, at::ArrayRef<double> coeffs) {
  check_lincomb(tensors, coeffs);
  c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> inputs;
  inputs.reserve(tensors.size());
  for (const auto& t : tensors) inputs.push_back(t.contiguous());
  auto out = at::empty(tensors[0].sizes(), tensors[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int64_t count = static_cast<int64_t>(inputs.size());
  ADAPTDIFF_DISPATCH_FLOATING(out.scalar_type(), "lincomb", [&] {
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    // Running float32 sum between batches: the output itself when it is float32.
    float* acc = nullptr;
    at::Tensor scratch;
    if (count > kMaxTensors) {
      if (std::is_same_v<scalar_t, float>) {
        acc = reinterpret_cast<float*>(po);
      } else {
        scratch = at::empty({n}, out.options().dtype(at::kFloat));
        acc = scratch.mutable_data_ptr<float>();
      }
    }
    const unsigned grid = cuda::blocks_for(n, kThreads);
    for (int64_t first = 0; first < count; first += kMaxTensors) {
      Batch<scalar_t> batch{};
      batch.count = static_cast<int>(std::min<int64_t>(kMaxTensors, count - first));
      for (int t = 0; t < batch.count; ++t) {
        batch.src[t] = inputs[first + t].const_data_ptr<scalar_t>();
        batch.coeff[t] = static_cast<float>(coeffs[first + t]);
      }
      const bool last = first + kMaxTensors >= count;
      lincomb_kernel<scalar_t><<<grid, kThreads, 0, cuda::stream()>>>(
          batch, first == 0 ? nullptr : acc, last ? nullptr : acc, po, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("lincomb", &adaptdiff::lincomb_cuda); }
