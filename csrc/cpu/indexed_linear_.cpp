// indexed_linear_: out[b, index[b, i]] = x[b, i] @ weight.T + bias, in place.
// The product belongs to BLAS: each thread takes a range of the B*K rows and, block by block,
// runs a single-threaded at::addmm into a block-sized temporary that stays in its L2 cache,
// then copies the block's rows into out. The reference materialises the whole [B*K, O] product
// and scatters it with an expanded [B, K, O] int64 index; here the product stays in cache.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "adaptdiff/indexed_linear_checks.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/row_copy.h"
#include "adaptdiff/token_checks.h"

namespace adaptdiff {
namespace {

constexpr const char* op = "indexed_linear_";

// Rows of the temporary per block: about 1.5 MiB, inside a core's L2 on current server parts
// (256 rows at O=1536 fp32), and enough rows for MKL's GEMM to stay near full speed (measured:
// 128-row blocks lose ~10% on this 1536x1536 weight, 256-1024 rows are equal).
int64_t block_rows(int64_t row_bytes) {
  return std::clamp<int64_t>((3 << 19) / std::max<int64_t>(1, row_bytes), 64, 1024);
}

}  // namespace

void indexed_linear__cpu(at::Tensor& out, const at::Tensor& index, const at::Tensor& x,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_indexed_linear_args(out, index, x, weight, bias);
  const int64_t B = out.size(0), N = out.size(1), O = out.size(2), K = index.size(1);
  const int64_t I = x.size(2);
  const auto ic = index.contiguous();
  check_index_values_cpu(op, ic, N, /*unique=*/true);
  if (B * K == 0 || O == 0) return;

  const int64_t rows = B * K;
  const auto x2 = x.contiguous().view({rows, I});
  // BLAS takes either layout of the weight as is; copy it once only when it has neither.
  const auto w = weight.is_contiguous() || weight.t().is_contiguous() ? weight : weight.contiguous();
  const auto wt = w.t();
  const auto row_bytes = static_cast<size_t>(O) * out.element_size();
  const int64_t blk = block_rows(static_cast<int64_t>(row_bytes));
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  auto* dst = static_cast<char*>(out.mutable_data_ptr());

  // Threads split the rows evenly (each at least 32, a GEMM's worth); blk only caps the
  // temporary. Inside parallel_for, at::addmm (MKL/oneDNN) runs on the calling thread only, so
  // the threads never meet at a barrier until the end (MKL's own threading of one big GEMM does,
  // per panel, which costs a lot on a loaded machine).
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: stay below autograd there too
    // (the op has no autograd; an out= addmm on inputs that require grad would raise).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto tmp = at::empty({std::min(blk, end - begin), O}, out.options());
    for (int64_t r0 = begin; r0 < end; r0 += blk) {
      const int64_t n = std::min(blk, end - r0);
      auto y = tmp.narrow(0, 0, n);
      const auto xb = x2.narrow(0, r0, n);
      if (bias) {
        at::addmm_out(y, *bias, xb, wt);
      } else {
        at::mm_out(y, xb, wt);
      }
      const auto* ys = static_cast<const char*>(y.const_data_ptr());
      for (int64_t r = r0; r < r0 + n; ++r) {
        copy_row(dst + ((r / K) * N + idx[r]) * row_bytes, ys + (r - r0) * row_bytes, row_bytes);
      }
    }
  });
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) {
  m.impl("indexed_linear_", &adaptdiff::indexed_linear__cpu);
}
