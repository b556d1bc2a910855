// sampled_wgrad: g = (grad_out^T x).view(-1)[indices] without forming the O x I product.
// Two strategies, picked by the density nnz / (O I):
// - sparse (SaRA's ~10%): per-entry dot products. The N dimension goes in chunks; each chunk
//   of grad_out and x is transposed into the accumulation type ([O, nc] and [I, nc], a few
//   hundred KiB that stay in cache), then every requested entry (o, i) adds the dot of row o and
//   row i. Work is nnz * N multiply-adds instead of the dense O * I * N.
// - dense: a block of output rows at a time, one single-threaded GEMM into a cache-sized
//   scratch tile, then the block's entries are gathered from it.
// Each entry is summed in a fixed order (chunk by chunk), so results are deterministic.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/sara_checks.h"
#include "vectorize.h"

namespace adaptdiff {
namespace {

constexpr const char* op = "sampled_wgrad";

// Above this density one GEMM per row block beats the per-entry dots (measured at 10%, one
// thread: the dots take ~0.47x the time of the dense GEMM for a tenth of its multiply-adds).
constexpr double kDenseAbove = 0.2;

constexpr int kLanes = 16;

// The dot loops get an AVX-512 clone too (one 16-float register per lane group; measured
// faster than the AVX2 clone on this AVX-512 CPU), beside the project's AVX2 and baseline ones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SARA_DOT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SARA_DOT_CLONES
#endif

// acc[j] += <a, b_j> for four rows b_0..b_3 sharing a: a is loaded once per four dots.
// Lane-wise partial sums (no reassociation needed for the compiler to vectorise).
template <typename acc_t>
SARA_DOT_CLONES void dot4(const acc_t* __restrict__ a, const acc_t* __restrict__ b0,
                               const acc_t* __restrict__ b1, const acc_t* __restrict__ b2,
                               const acc_t* __restrict__ b3, int64_t n, acc_t* out) {
  acc_t s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = a[j + l];
      s0[l] += v * b0[j + l];
      s1[l] += v * b1[j + l];
      s2[l] += v * b2[j + l];
      s3[l] += v * b3[j + l];
    }
  }
  acc_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; j < n; ++j) {
    t0 += a[j] * b0[j];
    t1 += a[j] * b1[j];
    t2 += a[j] * b2[j];
    t3 += a[j] * b3[j];
  }
  for (int l = 0; l < kLanes; ++l) {
    t0 += s0[l];
    t1 += s1[l];
    t2 += s2[l];
    t3 += s3[l];
  }
  out[0] += t0;
  out[1] += t1;
  out[2] += t2;
  out[3] += t3;
}

template <typename acc_t>
SARA_DOT_CLONES acc_t dot1(const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                int64_t n) {
  acc_t s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += a[j + l] * b[j + l];
  }
  acc_t t = 0;
  for (; j < n; ++j) t += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) t += s[l];
  return t;
}

// row_start[r] = first k with idx[k] >= r * C (idx sorted), row_start[R] = nnz.
std::vector<int64_t> row_starts(const int64_t* idx, int64_t nnz, int64_t R, int64_t C) {
  std::vector<int64_t> starts(R + 1);
  int64_t k = 0;
  for (int64_t r = 0; r <= R; ++r) {
    while (k < nnz && idx[k] < r * C) ++k;
    starts[r] = k;
  }
  return starts;
}

// The same entries in column-major order (a counting sort by column, stable, so rows stay
// ascending): flat indices into the transposed [C, R] matrix, and where each came from.
void transpose_entries(const int64_t* idx, int64_t nnz, int64_t R, int64_t C,
                       std::vector<int64_t>& t_idx, std::vector<int64_t>& src) {
  std::vector<int64_t> next(C + 1, 0);
  for (int64_t k = 0; k < nnz; ++k) ++next[idx[k] % C + 1];
  for (int64_t c = 0; c < C; ++c) next[c + 1] += next[c];
  t_idx.resize(nnz);
  src.resize(nnz);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t r = idx[k] / C, c = idx[k] % C;
    const int64_t pos = next[c]++;
    t_idx[pos] = c * R + r;
    src[pos] = k;
  }
}

// acc[k] = <a[:, r_k], b[:, c_k]> for the entries idx[k] = r_k * C + c_k of an [R, C] matrix
// (a: [N, R], b: [N, C], idx sorted). Per N-chunk, a and b are transposed into acc_t; b's chunk
// ([C, nc], ~1 MiB, about one core's L2: longer dots measured faster than a smaller chunk)
// stays in cache while every row of a's chunk meets its entries' columns.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void sparse_dots(const at::Tensor& a, const at::Tensor& b, const int64_t* idx, int64_t nnz,
                 acc_t* acc) {
  const int64_t N = a.size(0), R = a.size(1), C = b.size(1);
  const auto starts = row_starts(idx, nnz, R, C);
  const int64_t nc = std::clamp<int64_t>(
      (1 << 20) / (C * int64_t(sizeof(acc_t))) / kLanes * kLanes, kLanes, 512);
  const at::TensorOptions opts = a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor at_ = at::empty({R, std::min(nc, N)}, opts);
  at::Tensor bt = at::empty({C, std::min(nc, N)}, opts);
  const int64_t ld = at_.stride(0);
  const acc_t* ap = at_.const_data_ptr<acc_t>();
  const acc_t* bp = bt.const_data_ptr<acc_t>();
  for (int64_t n0 = 0; n0 < N; n0 += nc) {
    const int64_t len = std::min(nc, N - n0);
    at_.narrow(1, 0, len).copy_(a.narrow(0, n0, len).t());
    bt.narrow(1, 0, len).copy_(b.narrow(0, n0, len).t());
    at::parallel_for(0, R, 16, [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const acc_t* row = ap + r * ld;
        const int64_t base = r * C;
        int64_t k = starts[r];
        const int64_t e = starts[r + 1];
        for (; k + 4 <= e; k += 4) {
          dot4<acc_t>(row, bp + (idx[k] - base) * ld, bp + (idx[k + 1] - base) * ld,
                      bp + (idx[k + 2] - base) * ld, bp + (idx[k + 3] - base) * ld, len,
                      acc + k);
        }
        for (; k < e; ++k) acc[k] += dot1<acc_t>(row, bp + (idx[k] - base) * ld, len);
      }
    });
  }
}

// g[k] = (grad_out^T x)[o_k, i_k]. The cached operand is the narrower of the two ([*, nc]
// chunks of x when I <= O, else of grad_out with the entries re-sorted by column).
template <typename scalar_t>
void sparse_wgrad(const at::Tensor& grad_out, const at::Tensor& x, const int64_t* idx,
                  int64_t nnz, at::Tensor& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t O = grad_out.size(1), I = x.size(1);
  std::vector<acc_t> acc(nnz, acc_t(0));
  scalar_t* out = g.mutable_data_ptr<scalar_t>();
  if (I <= O) {
    sparse_dots<scalar_t>(grad_out, x, idx, nnz, acc.data());
    for (int64_t k = 0; k < nnz; ++k) out[k] = static_cast<scalar_t>(acc[k]);
  } else {
    std::vector<int64_t> t_idx, src;
    transpose_entries(idx, nnz, O, I, t_idx, src);
    sparse_dots<scalar_t>(x, grad_out, t_idx.data(), nnz, acc.data());
    for (int64_t k = 0; k < nnz; ++k) out[src[k]] = static_cast<scalar_t>(acc[k]);
  }
}

template <typename scalar_t>
void dense_tiles(const at::Tensor& grad_out, const at::Tensor& x, const int64_t* idx,
                 const std::vector<int64_t>& starts, at::Tensor& g) {
  const int64_t O = grad_out.size(1), I = x.size(1);
  const int64_t blk = std::clamp<int64_t>((1 << 18) / (I * x.element_size()), 16, 512);
  scalar_t* out = g.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, (O + blk - 1) / blk, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto tile = at::empty({std::min(blk, O), I}, x.options());
    const scalar_t* t = tile.const_data_ptr<scalar_t>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * blk, n = std::min(blk, O - o0);
      const int64_t k0 = starts[o0], k1 = starts[o0 + n];
      if (k0 == k1) continue;  // no requested entry in these rows: skip the GEMM
      auto tb = tile.narrow(0, 0, n);
      at::mm_out(tb, grad_out.narrow(1, o0, n).t(), x);
      for (int64_t k = k0; k < k1; ++k) out[k] = t[idx[k] - o0 * I];
    }
  });
}

}  // namespace

at::Tensor sampled_wgrad_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& indices) {
  check_sampled_wgrad_args(grad_out, x, indices);
  const int64_t N = x.size(0), O = grad_out.size(1), I = x.size(1);
  const auto ic = indices.contiguous();
  check_flat_index_values_cpu(op, ic, O * I, "grad_out^T x");
  const int64_t nnz = ic.numel();
  auto g = at::empty({nnz}, grad_out.options());
  if (nnz == 0) return g;
  if (N == 0) return g.zero_();

  const auto go = grad_out.contiguous(), xc = x.contiguous();
  const int64_t* idx = ic.const_data_ptr<int64_t>();
  const bool dense = static_cast<double>(nnz) > kDenseAbove * static_cast<double>(O * I);
  ADAPTDIFF_DISPATCH_FLOATING(x.scalar_type(), "sampled_wgrad_cpu", [&] {
    if (dense) {
      dense_tiles<scalar_t>(go, xc, idx, row_starts(idx, nnz, O, I), g);
    } else {
      sparse_wgrad<scalar_t>(go, xc, idx, nnz, g);
    }
  });
  return g;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("sampled_wgrad", &adaptdiff::sampled_wgrad_cpu); }
