// moe_unpermute: y[t] = sum_j weights[t, j] * y_sorted[row of assignment t*K + j]. One pass
// over sorted_src builds the inverse map (and proves it a permutation of the assignments plus
// padding); then each token sums its K rows in slot order, in at::opmath_type (float32; float64
// for double), products and sums rounded separately as in the reference. Tokens are split
// across threads, so every output row has one writer: deterministic, no atomics.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/moe_checks.h"
#include "adaptdiff/ops.h"
#include "vectorize.h"

namespace adaptdiff {
namespace {

constexpr const char* kOp = "moe_unpermute";

// row_of[a] = the row of y_sorted that holds assignment a (every a in [0, N) exactly once).
std::vector<int64_t> inverse_map(const int64_t* sorted_src, int64_t P, int64_t N) {
  std::vector<int64_t> row_of(N, -1);
  for (int64_t r = 0; r < P; ++r) {
    const int64_t a = sorted_src[r];
    if (a == -1) continue;
    ADAPTDIFF_CHECK(a >= 0 && a < N, kOp, "sorted_src out of range: sorted_src[", r, "] = ", a,
                    " but entries must be -1 (padding) or in [0, T*K) = [0, ", N, ")");
    ADAPTDIFF_CHECK(row_of[a] < 0, kOp, "sorted_src holds assignment ", a, " twice (rows ",
                    row_of[a], " and ", r, ")");
    row_of[a] = r;
  }
  for (int64_t a = 0; a < N; ++a) {
    ADAPTDIFF_CHECK(row_of[a] >= 0, kOp, "sorted_src misses assignment ", a,
                    " (each of the T*K = ", N, " assignments must appear exactly once)");
  }
  return row_of;
}

// out[0, D) = sum_j w[j] * rows[j][0, D). acc: D scratch acc_t (unused for float and double,
// which accumulate in out itself); cvt: D scratch floats for half and bfloat16 rows.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
ADAPTDIFF_CPU_CLONES void combine_token(const scalar_t* const* rows, const acc_t* w, int64_t K,
                                        int64_t D, acc_t* acc_scratch, acc_t* cvt,
                                        scalar_t* out) {
  constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;
  acc_t* __restrict__ acc;
  if constexpr (kNative) {
    acc = out;
  } else {
    acc = acc_scratch;
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
  for (int64_t j = 0; j < K; ++j) {
    const acc_t* __restrict__ v;
    if constexpr (kNative) {
      v = rows[j];
    } else {
      cpu::to_float(rows[j], cvt, D);
      v = cvt;
    }
    const acc_t c = w[j];
    for (int64_t d = 0; d < D; ++d) acc[d] += c * v[d];
  }
  if constexpr (!kNative) cpu::from_float(acc, out, D);
}

}  // namespace

at::Tensor moe_unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& sorted_src,
                             const at::Tensor& weights) {
  check_moe_unpermute(y_sorted, sorted_src, weights);
  const int64_t P = y_sorted.size(0), D = y_sorted.size(1);
  const int64_t T = weights.size(0), K = weights.size(1), N = T * K;
  const auto sc = sorted_src.contiguous();
  const auto row_of = inverse_map(sc.const_data_ptr<int64_t>(), P, N);

  auto y = at::empty({T, D}, y_sorted.options());
  if (y.numel() == 0) return y;
  const auto yc = y_sorted.contiguous();
  const bool is_double = y_sorted.scalar_type() == at::kDouble;
  const auto wc = weights.to(is_double ? at::kDouble : at::kFloat).contiguous();

  ADAPTDIFF_DISPATCH_FLOATING(y.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const acc_t* wp = wc.const_data_ptr<acc_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D));
    at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
      constexpr bool kNative = std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> acc(kNative ? 0 : D), cvt(kNative ? 0 : D);
      std::vector<const scalar_t*> rows(K);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t j = 0; j < K; ++j) rows[j] = yp + row_of[t * K + j] * D;
        combine_token<scalar_t>(rows.data(), wp + t * K, K, D, acc.data(), cvt.data(),
                                out + t * D);
      }
    });
  });
  return y;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) {
  m.impl("moe_unpermute", &adaptdiff::moe_unpermute_cpu);
}
