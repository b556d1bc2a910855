// lincomb: sum_i coeffs[i] * tensors[i] in one pass. Each block of kBlock output elements is
// accumulated over all tensors in at::opmath_type (float32; float64 for double) and rounded
// once to the output dtype: reference.lincomb's arithmetic, without its full-size temporaries.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/lincomb.h"
#include "adaptdiff/ops.h"
#include "vectorize.h"

namespace adaptdiff {
namespace {

constexpr int64_t kBlock = 1024;  // output elements per accumulator block (L1-resident)
constexpr int64_t kGrain = 32768;  // elements per task at least

// out[j] = sum_t coeff[t] * src[t][j] for j in [first, first + m), m <= kBlock. float and
// double accumulate in the output block itself, half and bfloat16 in a float block.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
ADAPTDIFF_CPU_CLONES void lincomb_block(const scalar_t* const* src, const acc_t* coeff,
                                        size_t count, int64_t first, int64_t m, scalar_t* out) {
  constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;
  alignas(64) acc_t block[kNative ? 1 : kBlock];
  alignas(64) acc_t converted[kNative ? 1 : kBlock];
  acc_t* __restrict__ acc;
  if constexpr (kNative) {
    acc = out + first;
  } else {
    acc = block;
  }
  for (size_t t = 0; t < count; ++t) {
    const acc_t* __restrict__ x;
    if constexpr (kNative) {
      x = src[t] + first;
    } else {
      cpu::to_float(src[t] + first, converted, m);
      x = converted;
    }
    const acc_t c = coeff[t];
    if (t == 0) {
      for (int64_t j = 0; j < m; ++j) acc[j] = acc_t(0) + c * x[j];  // 0 + c x, as the reference
    } else {
      for (int64_t j = 0; j < m; ++j) acc[j] += c * x[j];
    }
  }
  if constexpr (!kNative) cpu::from_float(block, out + first, m);
}

template <typename scalar_t>
void lincomb_kernel(const std::vector<at::Tensor>& inputs, at::ArrayRef<double> coeffs,
                    scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t count = inputs.size();
  std::vector<const scalar_t*> src(count);
  std::vector<acc_t> coeff(count);
  for (size_t t = 0; t < count; ++t) {
    src[t] = inputs[t].const_data_ptr<scalar_t>();
    coeff[t] = static_cast<acc_t>(coeffs[t]);  // torch's mul by a Python float rounds it alike
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kBlock) {
      lincomb_block(src.data(), coeff.data(), count, i, std::min(kBlock, end - i), out);
    }
  });
}

}  // namespace

at::Tensor lincomb_cpu(at::TensorList tensors, at::ArrayRef<double> coeffs) {
  check_lincomb(tensors, coeffs);
  std::vector<at::Tensor> inputs;
  inputs.reserve(tensors.size());
  for (const auto& t : tensors) inputs.push_back(t.contiguous());
  auto out = at::empty(tensors[0].sizes(), tensors[0].options());
  if (out.numel() == 0) return out;
  ADAPTDIFF_DISPATCH_FLOATING(out.scalar_type(), "lincomb", [&] {
    lincomb_kernel<scalar_t>(inputs, coeffs, out.mutable_data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("lincomb", &adaptdiff::lincomb_cpu); }
