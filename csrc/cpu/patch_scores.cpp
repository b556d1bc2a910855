// patch_scores: per pixel the population std (or L2 norm) over C, then the mean over each p x p
// patch. One fused pass: each task takes one band of p rows of one sample and streams its
// channels in order, each channel's p rows being one contiguous run of p*W values, into
// per-pixel sums held in a small per-thread buffer; then it finishes the band's patches.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/patch_scores_checks.h"

namespace adaptdiff {
namespace {

// One band: x points at v[b, 0, band rows, :], channels `plane` apart, n = p*W pixels.
// The variance is taken around a per-pixel shift (the first channel's value): the sums of
// (x - shift) stay small when the mean is large, so E[d^2] - E[d]^2 does not cancel.
template <typename scalar_t, typename acc_t, bool kStd>
void band_pixels(const scalar_t* x, int64_t C, int64_t plane, int64_t n, acc_t* shift, acc_t* s1,
                 acc_t* s2) {
  for (int64_t i = 0; i < n; ++i) {
    shift[i] = (kStd && C > 0) ? static_cast<acc_t>(x[i]) : acc_t(0);
    s1[i] = 0;
    s2[i] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * plane;
    if constexpr (kStd) {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = static_cast<acc_t>(row[i]) - shift[i];
        s1[i] += d;
        s2[i] += d * d;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = static_cast<acc_t>(row[i]);
        s2[i] += d * d;
      }
    }
  }
  // Per-pixel value into s2. C == 0 gives NaN for std (0/0) and 0 for l2, as torch does.
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kStd) {
      const acc_t mean = s1[i] * inv_c;
      const acc_t var = s2[i] * inv_c - mean * mean;
      s2[i] = std::sqrt(var < acc_t(0) ? acc_t(0) : var);  // keeps NaN (C == 0)
    } else {
      s2[i] = std::sqrt(s2[i]);
    }
  }
}

template <typename scalar_t, bool kStd>
void patch_scores_kernel(const at::Tensor& vc, at::Tensor& out, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = vc.size(0), C = vc.size(1), H = vc.size(2), W = vc.size(3);
  const int64_t bands = H / p, cols = W / p, n = p * W, plane = H * W;
  const scalar_t* v = vc.const_data_ptr<scalar_t>();
  float* o = out.mutable_data_ptr<float>();
  const acc_t inv_area = acc_t(1) / static_cast<acc_t>(p * p);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * C));
  at::parallel_for(0, B * bands, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * n);
    acc_t *shift = buf.data(), *s1 = shift + n, *pix = s1 + n;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / bands, band = t % bands;
      band_pixels<scalar_t, acc_t, kStd>(v + b * C * plane + band * n, C, plane, n, shift, s1,
                                         pix);
      float* orow = o + t * cols;  // t = b * bands + band: patches in row-major order
      for (int64_t j = 0; j < cols; ++j) {
        acc_t sum = 0;
        for (int64_t r = 0; r < p; ++r) {
          const acc_t* px = pix + r * W + j * p;
          for (int64_t k = 0; k < p; ++k) sum += px[k];
        }
        orow[j] = static_cast<float>(sum * inv_area);
      }
    }
  });
}

}  // namespace

at::Tensor patch_scores_cpu(const at::Tensor& v, int64_t patch, c10::string_view metric) {
  const bool is_std = check_patch_scores_args(v, patch, metric);
  const auto vc = v.contiguous();
  const int64_t B = v.size(0), H = v.size(2), W = v.size(3);
  auto out = at::empty({B, (H / patch) * (W / patch)}, v.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  ADAPTDIFF_DISPATCH_FLOATING(v.scalar_type(), "patch_scores_cpu", [&] {
    if (is_std) {
      patch_scores_kernel<scalar_t, true>(vc, out, patch);
    } else {
      patch_scores_kernel<scalar_t, false>(vc, out, patch);
    }
  });
  return out;
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("patch_scores", &adaptdiff::patch_scores_cpu); }
