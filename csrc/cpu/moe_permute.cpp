// moe_permute: the T*K (token, slot) assignments sorted by expert, stable, as a counting sort.
// 1. each chunk of assignments counts its experts (and checks their range);
// 2. one scan over (expert, chunk) gives every chunk its first row per expert, so each chunk
//    writes its assignments in order after those of earlier chunks: stable, whatever the
//    chunking;
// 3. each chunk writes its assignments' rows into sorted_src;
// 4. the rows of x_sorted are gathered in output order (sequential writes; pad rows zeroed).
// The reference sorts, then builds and scatters a [T*K, D] temporary: about three passes over
// the rows where this makes one. A row copy, so no dtype dispatch.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "adaptdiff/moe_checks.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/row_copy.h"

namespace adaptdiff {
namespace {

constexpr int64_t kMinChunk = 16384;  // assignments per chunk at least (counting is cheap)

template <typename index_t>
void sort_assignments(const index_t* experts, int64_t N, int64_t K, int64_t E, int64_t align,
                      int64_t P, int64_t* sorted_src, int64_t* offsets) {
  const int64_t chunks = std::clamp<int64_t>(N / kMinChunk, 1, at::get_num_threads());
  const auto chunk_begin = [&](int64_t c) { return N * c / chunks; };

  // 1. Histograms: counts[c * E + e], and the first out-of-range assignment per chunk.
  std::vector<int64_t> counts(chunks * E, 0);
  std::vector<int64_t> bad(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = counts.data() + c * E;
      for (int64_t a = chunk_begin(c); a < chunk_begin(c + 1); ++a) {
        const int64_t e = experts[a];
        if (e < 0 || e >= E) {
          bad[c] = a;
          break;
        }
        ++hist[e];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (bad[c] < 0) continue;
    const int64_t a = bad[c];
    ADAPTDIFF_CHECK(false, "moe_permute", "experts out of range: experts[", a / K, ", ", a % K,
                    "] = ", static_cast<int64_t>(experts[a]), " but num_experts is ", E);
  }

  // 2. Scan over (expert, chunk): counts becomes each chunk's first row per expert. Pad rows
  // (each group's tail, and everything past offsets[E]) get -1.
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = row;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = counts[c * E + e];
      counts[c * E + e] = row;
      row += n;
    }
    const int64_t end = offsets[e] + (row - offsets[e] + align - 1) / align * align;
    std::fill(sorted_src + row, sorted_src + end, -1);
    row = end;
  }
  offsets[E] = row;
  std::fill(sorted_src + row, sorted_src + P, -1);

  // 3. Each chunk places its assignments, in order.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = counts.data() + c * E;
      for (int64_t a = chunk_begin(c); a < chunk_begin(c + 1); ++a) {
        sorted_src[next[experts[a]]++] = a;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x,
                                                               const at::Tensor& experts,
                                                               int64_t num_experts,
                                                               int64_t align) {
  check_moe_permute(x, experts, num_experts, align);
  const int64_t T = x.size(0), D = x.size(1), K = experts.size(1), N = T * K, E = num_experts;
  const int64_t P = moe_permuted_rows(N, E, align);
  auto x_sorted = at::empty({P, D}, x.options());
  auto sorted_src = at::empty({P}, x.options().dtype(at::kLong));
  auto offsets = at::empty({E + 1}, x.options().dtype(at::kLong));

  const auto ec = experts.contiguous();
  int64_t* src = sorted_src.mutable_data_ptr<int64_t>();
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  if (ec.scalar_type() == at::kInt) {
    sort_assignments(ec.const_data_ptr<int32_t>(), N, K, E, align, P, src, off);
  } else {
    sort_assignments(ec.const_data_ptr<int64_t>(), N, K, E, align, P, src, off);
  }
  if (x_sorted.numel() == 0) return {x_sorted, sorted_src, offsets};

  // 4. Gather the rows in output order.
  const auto xc = x.contiguous();
  const auto row_bytes = static_cast<size_t>(D) * x.element_size();
  const auto* xp = static_cast<const char*>(xc.const_data_ptr());
  auto* dst = static_cast<char*>(x_sorted.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t a = src[r];
      if (a < 0) {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      } else {
        copy_row(dst + r * row_bytes, xp + (a / K) * row_bytes, row_bytes);
      }
    }
  });
  return {x_sorted, sorted_src, offsets};
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("moe_permute", &adaptdiff::moe_permute_cpu); }
