// gather_tokens: out[b, i] = x[b, index[b, i]]. A row copy, so no dtype dispatch: D elements
// per row, rows split across threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "adaptdiff/row_copy.h"
#include "adaptdiff/token_checks.h"

namespace adaptdiff {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "gather_tokens";
  check_floating(op, "x", x);
  check_token_index(op, x, "x", index);
  const auto xc = x.contiguous();
  const auto ic = index.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = index.size(1);
  check_index_values_cpu(op, ic, N, /*unique=*/false);

  auto out = at::empty({B, K, D}, x.options());
  if (out.numel() == 0) return out;
  const auto row_bytes = static_cast<size_t>(D) * x.element_size();
  const auto* src = static_cast<const char*>(xc.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K;
      copy_row(dst + r * row_bytes, src + (b * N + idx[r]) * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("gather_tokens", &adaptdiff::gather_tokens_cpu); }
