// block_attention on the CPU: flash-style tiles of kQ queries x kK keys. The forward keeps a
// running max and sum per query row (online softmax) and visits only the key tiles the layout
// allows (block_mask.h); only tiles cut by the mask get an element mask. The backward recomputes
// the probabilities per tile from the log-sum-exp, in two deterministic passes: dQ per query
// tile, then dK and dV per key tile (summing the GQA group's heads in order, no atomics).
// Working memory is a few tiles per thread plus O(L) per head; never an L x L matrix.
// float16/bfloat16 run in float32 (converted once at entry), float64 in float64.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "adaptdiff/block_attention_checks.h"
#include "adaptdiff/ops.h"
#include "vectorize.h"

namespace adaptdiff {
namespace {

using block_mask::Row;
using block_mask::Spec;

constexpr int64_t kQ = 64;  // query rows per tile
constexpr int64_t kK = 64;  // keys per tile

// ------------------------------------------------------------------------- row primitives

// exp(x) for x <= 0 in float: 2^n * p(r), r = x - n ln2, |r| <= ln2/2, degree-6 polynomial
// (relative error ~2e-7); the rounding uses the 1.5 * 2^23 trick so the loop vectorises.
// Below -87 (and -inf, the mask) it returns exactly 0.
inline float exp_nonpositive(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(magic);
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = std::bit_cast<float>((ni + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

ADAPTDIFF_CPU_CLONES float scale_max(float* __restrict s, int64_t n, float scale) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= scale;
    m = s[j] > m ? s[j] : m;
  }
  return m;
}

double scale_max(double* s, int64_t n, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j] *= scale);
  return m;
}

// s[j] = exp(s[j] - m), returns the sum.
ADAPTDIFF_CPU_CLONES float exp_shift_sum(float* __restrict s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return sum;
}

double exp_shift_sum(double* s, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  return sum;
}

// p[j] = exp(s[j] * scale - lse) (the probabilities from the saved log-sum-exp).
ADAPTDIFF_CPU_CLONES void probs(float* __restrict s, int64_t n, float scale, float lse) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] * scale - lse);
}

void probs(double* s, int64_t n, double scale, double lse) {
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] * scale - lse);
}

// ds[j] = p[j] * (dp[j] - delta)
ADAPTDIFF_CPU_CLONES void softmax_grad(const float* __restrict p, float* __restrict dp, int64_t n,
                                       float delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

void softmax_grad(const double* p, double* dp, int64_t n, double delta) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// The transposed tile of the dK/dV pass: one key's row over n queries, each with its own
// log-sum-exp and delta. p = exp(s * scale - lse), dp = p * (dp - delta).
ADAPTDIFF_CPU_CLONES void probs_grad_cols(float* __restrict p, float* __restrict dp, int64_t n,
                                          float scale, const float* __restrict lse,
                                          const float* __restrict delta) {
  for (int64_t r = 0; r < n; ++r) {
    const float e = exp_nonpositive(p[r] * scale - lse[r]);
    p[r] = e;
    dp[r] = e * (dp[r] - delta[r]);
  }
}

void probs_grad_cols(double* p, double* dp, int64_t n, double scale, const double* lse,
                     const double* delta) {
  for (int64_t r = 0; r < n; ++r) {
    p[r] = std::exp(p[r] * scale - lse[r]);
    dp[r] = p[r] * (dp[r] - delta[r]);
  }
}

ADAPTDIFF_CPU_CLONES void scale_row(float* __restrict x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Element mask of one row on the keys [k0, k0 + n): masked entries become `fill`.
template <typename T>
void mask_row(T* s, int64_t n, const Row& row, int64_t k0, T fill) {
  for (int64_t j = 0; j < n; ++j) {
    if (!row.allows(k0 + j)) s[j] = fill;
  }
}

// dst[d][j] = src[j][d]: a [rows, D] tile (row stride D) as [D, rows].
template <typename T>
void transpose(const T* __restrict src, T* __restrict dst, int64_t rows, int64_t D) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) dst[d * rows + j] = src[j * D + d];
  }
}

// Row-major C[M, N] (+)= A[M, K] B[K, N] with leading dimensions.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// ------------------------------------------------------------------------------ layout

struct Dims {
  int64_t B, H, Hk, Lq, Lk, D;
  int64_t group() const { return H / Hk; }
  int64_t q_tiles() const { return (Lq + kQ - 1) / kQ; }
  int64_t k_tiles() const { return (Lk + kK - 1) / kK; }
};

template <typename T>
struct Views {  // contiguous [B, H(k), L, D] buffers of the compute type
  const T *q, *k, *v;
};

// ------------------------------------------------------------------------------ forward

// One query tile of one head: out rows and their log-sum-exp.
template <typename T>
struct ForwardTile {
  const Spec& spec;
  const Dims& d;
  T scale;
  std::vector<T> s, kt, acc, m, l;
  std::vector<Row> rows;

  ForwardTile(const Spec& sp, const Dims& dims, T sc)
      : spec(sp), d(dims), scale(sc), s(kQ * kK), kt(dims.D * kK), acc(kQ * dims.D), m(kQ),
        l(kQ), rows(kQ) {}

  // q: the tile's first query row; k, v: the head's keys. Writes out [nq, D] and lse [nq].
  void run(const T* q, const T* k, const T* v, int64_t q0, T* out, T* lse) {
    const int64_t D = d.D, nq = std::min(kQ, d.Lq - q0);
    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < nq; ++r) rows[r] = spec.row(q0 + r);
    std::fill(acc.begin(), acc.begin() + nq * D, T(0));
    std::fill(m.begin(), m.begin() + nq, neg_inf);
    std::fill(l.begin(), l.begin() + nq, T(0));
    const Row env = spec.envelope(q0, q0 + nq);
    int64_t t0, t1;
    block_mask::tile_span(env, kK, d.k_tiles(), &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kK, nk = std::min(kK, d.Lk - k0);
      if (!env.touches(k0, k0 + nk)) continue;  // masked for every row of the tile: skipped
      transpose(k + k0 * D, kt.data(), nk, D);
      gemm(nq, nk, D, q, D, kt.data(), nk, s.data(), nk, /*add=*/false);
      for (int64_t r = 0; r < nq; ++r) {
        T* sr = s.data() + r * nk;
        const Row& row = rows[r];
        if (!row.touches(k0, k0 + nk)) {
          std::fill(sr, sr + nk, T(0));
          continue;
        }
        T mx = scale_max(sr, nk, scale);
        if (!row.covers(k0, k0 + nk)) {
          mask_row(sr, nk, row, k0, neg_inf);
          mx = neg_inf;
          for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, sr[j]);
        }
        const T m_new = std::max(m[r], mx);
        const T alpha = m[r] == neg_inf ? T(0) : std::exp(m[r] - m_new);
        const T sum = exp_shift_sum(sr, nk, m_new);
        if (alpha != T(1)) scale_row(acc.data() + r * D, D, alpha);
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
      }
      gemm(nq, D, nk, s.data(), nk, v + k0 * D, D, acc.data(), D, /*add=*/true);
    }
    for (int64_t r = 0; r < nq; ++r) {
      T* o = out + r * D;
      if (l[r] > T(0)) {
        const T inv = T(1) / l[r];
        for (int64_t c = 0; c < D; ++c) o[c] = acc[r * D + c] * inv;
        lse[r] = m[r] + std::log(l[r]);
      } else {  // no key at all (only when Lk = 0)
        std::fill(o, o + D, T(0));
        lse[r] = neg_inf;
      }
    }
  }
};

template <typename T>
void forward(const Spec& spec, const Dims& d, T scale, Views<T> in, T* out, T* lse) {
  const int64_t nqt = d.q_tiles(), tasks = d.B * d.H * nqt;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ForwardTile<T> tile(spec, d, scale);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqt, q0 = (task % nqt) * kQ;
      const int64_t b = bh / d.H, h = bh % d.H, bhk = b * d.Hk + h / d.group();
      tile.run(in.q + (bh * d.Lq + q0) * d.D, in.k + bhk * d.Lk * d.D, in.v + bhk * d.Lk * d.D,
               q0, out + (bh * d.Lq + q0) * d.D, lse + bh * d.Lq + q0);
    }
  });
}

// ----------------------------------------------------------------------------- backward

// Pass 1, per query tile: the log-sum-exp (recomputed: the public op returns only out),
// delta = rowsum(dO * O), then dQ = scale * sum_tiles dS K with dS = P (dP - delta).
template <typename T>
void backward_dq(const Spec& spec, const Dims& d, T scale, Views<T> in, const T* out,
                 const T* gout, T* lse, T* delta, T* gq) {
  const int64_t nqt = d.q_tiles(), tasks = d.B * d.H * nqt, D = d.D;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ForwardTile<T> fwd(spec, d, scale);
    std::vector<T> o(kQ * D), s(kQ * kK), dp(kQ * kK), kt(D * kK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqt, q0 = (task % nqt) * kQ, nq = std::min(kQ, d.Lq - q0);
      const int64_t b = bh / d.H, h = bh % d.H, bhk = b * d.Hk + h / d.group();
      const T* q = in.q + (bh * d.Lq + q0) * D;
      const T* k = in.k + bhk * d.Lk * D;
      const T* v = in.v + bhk * d.Lk * D;
      const T* go = gout + (bh * d.Lq + q0) * D;
      T* lse_t = lse + bh * d.Lq + q0;
      T* delta_t = delta + bh * d.Lq + q0;
      T* dq = gq + (bh * d.Lq + q0) * D;
      fwd.run(q, k, v, q0, o.data(), lse_t);
      const T* ot = out + (bh * d.Lq + q0) * D;  // the saved output, as autograd saw it
      for (int64_t r = 0; r < nq; ++r) {
        T acc = 0;
        for (int64_t c = 0; c < D; ++c) acc += go[r * D + c] * ot[r * D + c];
        delta_t[r] = acc;
      }
      std::fill(dq, dq + nq * D, T(0));
      const Row env = spec.envelope(q0, q0 + nq);
      int64_t t0, t1;
      block_mask::tile_span(env, kK, d.k_tiles(), &t0, &t1);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k0 = t * kK, nk = std::min(kK, d.Lk - k0);
        if (!env.touches(k0, k0 + nk)) continue;
        transpose(k + k0 * D, kt.data(), nk, D);
        gemm(nq, nk, D, q, D, kt.data(), nk, s.data(), nk, false);
        transpose(v + k0 * D, kt.data(), nk, D);
        gemm(nq, nk, D, go, D, kt.data(), nk, dp.data(), nk, false);
        for (int64_t r = 0; r < nq; ++r) {
          T* sr = s.data() + r * nk;
          T* dr = dp.data() + r * nk;
          const Row row = spec.row(q0 + r);
          if (!row.touches(k0, k0 + nk)) {
            std::fill(dr, dr + nk, T(0));
            continue;
          }
          probs(sr, nk, scale, lse_t[r]);
          if (!row.covers(k0, k0 + nk)) mask_row(sr, nk, row, k0, T(0));
          softmax_grad(sr, dr, nk, delta_t[r]);
        }
        gemm(nq, D, nk, dp.data(), nk, k + k0 * D, D, dq, D, true);
      }
      scale_row(dq, nq * D, scale);
    }
  });
}

// Pass 2, per key tile of each K/V head: dV = sum P^T dO and dK = scale * sum dS^T Q over the
// query tiles (of every head of the GQA group) that see the key tile.
template <typename T>
void backward_dkv(const Spec& spec, const Dims& d, T scale, Views<T> in, const T* gout,
                  const T* lse, const T* delta, T* gk, T* gv) {
  const int64_t nqt = d.q_tiles(), nkt = d.k_tiles(), D = d.D;
  std::vector<Row> envs(nqt);
  for (int64_t t = 0; t < nqt; ++t) envs[t] = spec.envelope(t * kQ, std::min(d.Lq, t * kQ + kQ));
  const int64_t tasks = d.B * d.Hk * nkt;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qt(D * kQ), pt(kK * kQ), dpt(kK * kQ);
    std::vector<Row> rows(kQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / nkt, k0 = (task % nkt) * kK, nk = std::min(kK, d.Lk - k0);
      const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
      const T* k = in.k + (bhk * d.Lk + k0) * D;
      const T* v = in.v + (bhk * d.Lk + k0) * D;
      T* dk = gk + (bhk * d.Lk + k0) * D;
      T* dv = gv + (bhk * d.Lk + k0) * D;
      std::fill(dk, dk + nk * D, T(0));
      std::fill(dv, dv + nk * D, T(0));
      for (int64_t t = 0; t < nqt; ++t) {
        if (!envs[t].touches(k0, k0 + nk)) continue;
        const int64_t q0 = t * kQ, nq = std::min(kQ, d.Lq - q0);
        bool all_cover = true;
        for (int64_t r = 0; r < nq; ++r) {
          rows[r] = spec.row(q0 + r);
          all_cover = all_cover && rows[r].covers(k0, k0 + nk);
        }
        for (int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
          const int64_t bh = b * d.H + h;
          const T* q = in.q + (bh * d.Lq + q0) * D;
          const T* go = gout + (bh * d.Lq + q0) * D;
          const T* lse_t = lse + bh * d.Lq + q0;
          const T* delta_t = delta + bh * d.Lq + q0;
          transpose(q, qt.data(), nq, D);
          gemm(nk, nq, D, k, D, qt.data(), nq, pt.data(), nq, false);  // S^T [nk, nq]
          transpose(go, qt.data(), nq, D);
          gemm(nk, nq, D, v, D, qt.data(), nq, dpt.data(), nq, false);  // dP^T [nk, nq]
          for (int64_t c = 0; c < nk; ++c) {
            T* p = pt.data() + c * nq;
            T* dp = dpt.data() + c * nq;
            probs_grad_cols(p, dp, nq, scale, lse_t, delta_t);
            if (all_cover) continue;
            for (int64_t r = 0; r < nq; ++r) {
              if (!rows[r].allows(k0 + c)) p[r] = dp[r] = T(0);
            }
          }
          gemm(nk, D, nq, pt.data(), nq, go, D, dv, D, true);
          gemm(nk, D, nq, dpt.data(), nq, q, D, dk, D, true);
        }
      }
      scale_row(dk, nk * D, scale);
    }
  });
}

// ------------------------------------------------------------------------------- entry

template <typename T>
Views<T> views(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>()};
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Dims dims_of(const BlockAttentionArgs& a) {
  return {a.B, a.H, a.Hk, a.spec.Lq, a.spec.Lk, a.D};
}

}  // namespace

at::Tensor block_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t block_size, c10::string_view layout,
                               std::optional<double> scale) {
  const auto a = check_block_attention_args("block_attention", q, k, v, block_size, layout, scale);
  const Dims d = dims_of(a);
  if (q.numel() == 0) return at::zeros(q.sizes(), q.options());
  const auto ct = compute_type(q);
  const auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  auto out = at::empty(q.sizes(), qc.options());
  auto lse = at::empty({d.B, d.H, d.Lq}, qc.options());
  if (ct == at::kDouble) {
    forward<double>(a.spec, d, a.scale, views<double>(qc, kc, vc), out.mutable_data_ptr<double>(),
                    lse.mutable_data_ptr<double>());
  } else {
    forward<float>(a.spec, d, float(a.scale), views<float>(qc, kc, vc),
                   out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
  }
  return out.to(q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, int64_t block_size, c10::string_view layout,
    std::optional<double> scale) {
  constexpr const char* op = "block_attention_backward";
  const auto a = check_block_attention_args(op, q, k, v, block_size, layout, scale);
  check_block_attention_grads(op, grad_out, out, q);
  const Dims d = dims_of(a);
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  const auto ct = compute_type(q);
  const auto qc = q.to(ct).contiguous(), kc = k.to(ct).contiguous(), vc = v.to(ct).contiguous();
  const auto oc = out.to(ct).contiguous(), gc = grad_out.to(ct).contiguous();
  auto gq = at::empty(q.sizes(), qc.options());
  auto gk = at::empty(k.sizes(), kc.options());
  auto gv = at::empty(v.sizes(), vc.options());
  auto lse = at::empty({d.B, d.H, d.Lq}, qc.options());
  auto delta = at::empty({d.B, d.H, d.Lq}, qc.options());
  auto run = [&]<typename T>(T) {
    const auto in = views<T>(qc, kc, vc);
    backward_dq<T>(a.spec, d, T(a.scale), in, oc.const_data_ptr<T>(), gc.const_data_ptr<T>(),
                   lse.mutable_data_ptr<T>(), delta.mutable_data_ptr<T>(),
                   gq.mutable_data_ptr<T>());
    backward_dkv<T>(a.spec, d, T(a.scale), in, gc.const_data_ptr<T>(), lse.const_data_ptr<T>(),
                    delta.const_data_ptr<T>(), gk.mutable_data_ptr<T>(), gv.mutable_data_ptr<T>());
  };
  if (ct == at::kDouble) {
    run(0.0);
  } else {
    run(0.0f);
  }
  const auto dt = q.scalar_type();
  return {gq.to(dt), gk.to(dt), gv.to(dt)};
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) {
  m.impl("block_attention", &adaptdiff::block_attention_cpu);
  m.impl("block_attention_backward", &adaptdiff::block_attention_backward_cpu);
}
