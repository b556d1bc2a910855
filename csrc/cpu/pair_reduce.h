#pragma once
// CPU driver of the per-sample pair reductions (rel_l1, cosine); the arithmetic is in
// adaptdiff/pair_reduction.h.
//
// B is often 1 or 2 with millions of elements per sample, so the work is split inside each
// sample: fixed-size chunks, whatever the thread count, each summed into kLanes independent
// accumulators of at::opmath_type (float32; float64 for double). Independent lanes let the
// compiler use SIMD registers without reassociating anything; the per-chunk partials are then
// added in double, in chunk order. One build thus gives bit-identical results on any number
// of threads. Half and bfloat16 are converted to float kBlock elements at a time (vectorize.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/pair_reduction.h"
#include "vectorize.h"

namespace adaptdiff::cpu {

constexpr int64_t kChunk = 32768;  // elements behind one partial sum
constexpr int kLanes = 16;         // independent accumulators per sum
constexpr int64_t kBlock = 512;    // half/bfloat16 elements converted to float at a time

// Adds pairs [0, n) into lanes[k * kLanes + l]; element i always goes to lane i % kLanes.
// `omp simd` makes GCC vectorise across the lanes (left alone, it vectorises the outer loop
// with costly shuffles); lanes are independent, so this changes no result.
template <typename Terms, typename T>
inline void accumulate(const T* __restrict__ x, const T* __restrict__ y, int64_t n,
                       T* __restrict__ lanes) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) Terms::add(lanes + l, kLanes, x[i + l], y[i + l]);
  }
  for (int64_t l = 0; l < n - i; ++l) Terms::add(lanes + l, kLanes, x[i + l], y[i + l]);
}

// The K sums of one chunk of n <= kChunk elements (a multiple of kLanes except at a sample's end).
template <typename Terms, typename scalar_t>
ADAPTDIFF_CPU_CLONES void chunk_sums(const scalar_t* a, const scalar_t* b, int64_t n, double* out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[Terms::K * kLanes] = {};
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    accumulate<Terms>(a, b, n, lanes);
  } else {
    alignas(64) acc_t fa[kBlock], fb[kBlock];
    for (int64_t i = 0; i < n; i += kBlock) {
      const int64_t m = std::min(kBlock, n - i);
      to_float(a + i, fa, m);
      to_float(b + i, fb, m);
      accumulate<Terms>(fa, fb, m, lanes);
    }
  }
  for (int k = 0; k < Terms::K; ++k) {
    double s = 0;
    for (int l = 0; l < kLanes; ++l) s += lanes[k * kLanes + l];
    out[k] = s;
  }
}

template <typename Terms>
at::Tensor pair_reduce_cpu(const at::Tensor& a, const at::Tensor& b) {
  constexpr int K = Terms::K;
  constexpr const char* op = Terms::kOp;
  check_pair_reduction(op, a, b);
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options().dtype(at::kFloat));
  if (B == 0) return out;
  const auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t n = a.numel() / B;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(B * chunks * K);
  // Tasks of at least ~kChunk elements, so tiny samples do not each pay a thread hand-off.
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, std::min(n, kChunk)));
  ADAPTDIFF_DISPATCH_FLOATING(a.scalar_type(), op, [&] {
    const scalar_t* pa = ac.const_data_ptr<scalar_t>();
    const scalar_t* pb = bc.const_data_ptr<scalar_t>();
    at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t first = (t / chunks) * n + (t % chunks) * kChunk;
        const int64_t len = std::min(kChunk, n - (t % chunks) * kChunk);
        chunk_sums<Terms>(pa + first, pb + first, len, partial.data() + t * K);
      }
    });
  });
  float* o = out.mutable_data_ptr<float>();
  for (int64_t s = 0; s < B; ++s) {
    double sums[K] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int k = 0; k < K; ++k) sums[k] += partial[(s * chunks + c) * K + k];
    }
    o[s] = Terms::finish(sums);
  }
  return out;
}

}  // namespace adaptdiff::cpu
