// scatter_tokens: a copy of base with rows index[b, i] replaced by src[b, i]. One pass over the
// output: an inverse map (token -> row of src, or -1) says where each output row comes from, so
// every row is written exactly once (a clone-then-scatter writes the K rows twice and reads an
// expanded B*K*D index). A row copy, so no dtype dispatch.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "adaptdiff/ops.h"
#include "adaptdiff/row_copy.h"
#include "adaptdiff/token_checks.h"

namespace adaptdiff {

at::Tensor scatter_tokens_cpu(const at::Tensor& base, const at::Tensor& index,
                              const at::Tensor& src) {
  constexpr const char* op = "scatter_tokens";
  check_scatter_tokens_args(base, index, src);
  const int64_t B = base.size(0), N = base.size(1), D = base.size(2), K = index.size(1);
  const auto ic = index.contiguous();
  check_index_values_cpu(op, ic, N, /*unique=*/true);

  auto out = at::empty({B, N, D}, base.options());
  if (out.numel() == 0) return out;
  const auto bc = base.contiguous();
  const auto sc = src.contiguous();

  // from[b * N + n] = b * K + i when index[b, i] == n, else -1 (the row stays base's).
  std::vector<int64_t> from(B * N, -1);
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B * K; ++r) from[(r / K) * N + idx[r]] = r;

  const auto row_bytes = static_cast<size_t>(D) * base.element_size();
  const auto* base_p = static_cast<const char*>(bc.const_data_ptr());
  const auto* src_p = static_cast<const char*>(sc.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = from[r];
      copy_row(dst + r * row_bytes, s < 0 ? base_p + r * row_bytes : src_p + s * row_bytes,
               row_bytes);
    }
  });
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("scatter_tokens", &adaptdiff::scatter_tokens_cpu); }
