// sara_linear: y = x W_eff^T + bias, W_eff = weight with W_eff.view(-1)[indices] = values.
// W_eff is never built whole: each thread takes a block of output features, copies those rows
// of the frozen weight into a cache-sized scratch, writes the block's trainable values into it
// (indices are sorted, so a block's values are one contiguous range) and runs one
// single-threaded GEMM into the block's columns of y. The reference clones the whole weight and
// scatters into it first (a weight-sized temporary and an extra pass over it).
// The weight may have any strides: the autograd's input gradient calls this op on weight.t().
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/sara_checks.h"

namespace adaptdiff {
namespace {

constexpr const char* op = "sara_linear";

// Rows of the weight scratch per block: about 256 KiB (it stays in L2 while the GEMM streams
// x past it), at least 32 rows so the GEMM keeps its speed.
int64_t block_rows(int64_t row_bytes) {
  return std::clamp<int64_t>((1 << 18) / std::max<int64_t>(1, row_bytes), 32, 512);
}

}  // namespace

at::Tensor sara_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& indices,
                           const at::Tensor& values) {
  check_sara_linear_args(x, weight, bias, indices, values);
  const int64_t O = weight.size(0), I = weight.size(1);
  const auto ic = indices.contiguous();
  check_flat_index_values_cpu(op, ic, O * I, "weight");

  auto out_shape = x.sizes().vec();
  out_shape.back() = O;
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const auto x2 = x.reshape({N, I}).contiguous();
  auto y = at::empty({N, O}, x.options());
  if (N == 0 || O == 0) return y.view(out_shape);
  if (I == 0) {
    bias ? y.copy_(bias->unsqueeze(0).expand({N, O})) : y.zero_();
    return y.view(out_shape);
  }

  const auto vc = values.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t nnz = ic.numel();
  const int64_t blk = block_rows(I * x.element_size());

  ADAPTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sara_linear_cpu", [&] {
    const scalar_t* vals = vc.const_data_ptr<scalar_t>();
    at::parallel_for(0, (O + blk - 1) / blk, 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: stay below autograd.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto scratch = at::empty({std::min(blk, O), I}, weight.options());
      scalar_t* s = scratch.mutable_data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o0 = b * blk, n = std::min(blk, O - o0);
        auto w = scratch.narrow(0, 0, n);
        w.copy_(weight.narrow(0, o0, n));
        const int64_t lo = o0 * I, hi = (o0 + n) * I;
        const int64_t k0 = std::lower_bound(idx, idx + nnz, lo) - idx;
        for (int64_t k = k0; k < nnz && idx[k] < hi; ++k) s[idx[k] - lo] = vals[k];
        auto yb = y.narrow(1, o0, n);  // row stride O: BLAS writes it in place
        if (bias) {
          at::addmm_out(yb, bias->narrow(0, o0, n), x2, w.t());
        } else {
          at::mm_out(yb, x2, w.t());
        }
      }
    });
  });
  return y.view(out_shape);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("sara_linear", &adaptdiff::sara_linear_cpu); }
