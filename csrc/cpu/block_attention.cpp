// block_attention on the CPU ("decode", which masks nothing, forwards to ATen's attention):
// flash-style tiles of kQ queries x kK keys. The forward keeps a
// running max and sum per query row (online softmax) and visits only the key tiles the layout
// allows (block_mask.h); only tiles cut by the mask get an element mask. The backward recomputes
// the probabilities per tile from the log-sum-exp, in two deterministic passes: dQ per query
// tile, then dK and dV per key tile (summing the GQA group's heads in order, no atomics).
// Working memory is a few tiles per thread plus O(L) per head; never an L x L matrix.
// float16/bfloat16 run in float32 (converted once at entry), float64 in float64.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bit>
#include <cstdlib>
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

#ifdef ADAPTDIFF_X86_F16C
// AVX2 + FMA versions of the row loops (GCC does not vectorise a float sum or max without
// -ffast-math, nor the masked exp). Picked at run time; the polynomial is exp_nonpositive's.
// ADAPTDIFF_NO_AVX2=1 forces the portable loops (the tests use it to cover them).
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("ADAPTDIFF_NO_AVX2") == nullptr;
  return has;
}

#define ADAPTDIFF_AVX2 __attribute__((target("avx2,fma")))

ADAPTDIFF_AVX2 inline __m256 exp256_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256 two_n =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, two_n));
}

ADAPTDIFF_AVX2 inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

ADAPTDIFF_AVX2 inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

ADAPTDIFF_AVX2 float scale_max_avx2(float* s, int64_t n, float scale) {
  const __m256 a = _mm256_set1_ps(scale);
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), a);
    _mm256_storeu_ps(s + j, x);
    m = _mm256_max_ps(m, x);
  }
  float mx = hmax(m);
  for (; j < n; ++j) mx = std::max(mx, s[j] *= scale);
  return mx;
}

ADAPTDIFF_AVX2 float exp_shift_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (s[j] = exp_nonpositive(s[j] - m));
  return sum;
}

ADAPTDIFF_AVX2 void probs_avx2(float* s, int64_t n, float scale, float lse) {
  const __m256 a = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(s + j), a, l);
    _mm256_storeu_ps(s + j, exp256_nonpositive(x));
  }
  for (; j < n; ++j) s[j] = exp_nonpositive(s[j] * scale - lse);
}

ADAPTDIFF_AVX2 void probs_grad_cols_avx2(float* p, float* dp, int64_t n, float scale,
                                         const float* lse, const float* delta) {
  const __m256 a = _mm256_set1_ps(scale);
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(p + r), a, _mm256_loadu_ps(lse + r));
    const __m256 e = exp256_nonpositive(x);
    _mm256_storeu_ps(p + r, e);
    const __m256 g = _mm256_sub_ps(_mm256_loadu_ps(dp + r), _mm256_loadu_ps(delta + r));
    _mm256_storeu_ps(dp + r, _mm256_mul_ps(e, g));
  }
  for (; r < n; ++r) {
    p[r] = exp_nonpositive(p[r] * scale - lse[r]);
    dp[r] = p[r] * (dp[r] - delta[r]);
  }
}
#endif

float scale_max(float* __restrict s, int64_t n, float scale) {
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_avx2_fma()) return scale_max_avx2(s, n, scale);
#endif
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j] *= scale);
  return m;
}

double scale_max(double* s, int64_t n, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j] *= scale);
  return m;
}

// s[j] = exp(s[j] - m), returns the sum.
float exp_shift_sum(float* __restrict s, int64_t n, float m) {
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_avx2_fma()) return exp_shift_sum_avx2(s, n, m);
#endif
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
void probs(float* __restrict s, int64_t n, float scale, float lse) {
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_avx2_fma()) return probs_avx2(s, n, scale, lse);
#endif
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
void probs_grad_cols(float* __restrict p, float* __restrict dp, int64_t n, float scale,
                     const float* __restrict lse, const float* __restrict delta) {
#ifdef ADAPTDIFF_X86_F16C
  if (cpu_has_avx2_fma()) return probs_grad_cols_avx2(p, dp, n, scale, lse, delta);
#endif
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

// dst[d][j] = src[j][d]: a [rows, D] tile (row stride ld, default D) as [D, rows].
template <typename T>
void transpose(const T* __restrict src, T* __restrict dst, int64_t rows, int64_t D,
               int64_t ld = 0) {
  if (ld == 0) ld = D;
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) dst[d * rows + j] = src[j * ld + d];
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

// [B, H(k), L, D] inputs in the compute type, the head dim contiguous: strides of B, H, L. The
// forward reads them in place (a slice of a KV cache is not copied); the backward takes
// contiguous copies.
template <typename T>
struct Views {
  const T *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];
  const T* q_at(int64_t b, int64_t h, int64_t l) const {
    return q + b * qs[0] + h * qs[1] + l * qs[2];
  }
  const T* k_at(int64_t b, int64_t h) const { return k + b * ks[0] + h * ks[1]; }
  const T* v_at(int64_t b, int64_t h) const { return v + b * vs[0] + h * vs[1]; }
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

  // q: the tile's first query row; k, v: the head's keys; ld*: their row strides. Writes
  // out [nq, D] and lse [nq]; with out = nullptr only lse (the backward's recomputation).
  void run(const T* q, int64_t ldq, const T* k, int64_t ldk, const T* v, int64_t ldv, int64_t q0,
           T* out, T* lse) {
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
      transpose(k + k0 * ldk, kt.data(), nk, D, ldk);
      gemm(nq, nk, D, q, ldq, kt.data(), nk, s.data(), nk, /*add=*/false);
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
        if (out != nullptr && alpha != T(1)) scale_row(acc.data() + r * D, D, alpha);
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
      }
      if (out != nullptr) gemm(nq, D, nk, s.data(), nk, v + k0 * ldv, ldv, acc.data(), D, true);
    }
    for (int64_t r = 0; r < nq; ++r) {
      lse[r] = l[r] > T(0) ? m[r] + std::log(l[r]) : neg_inf;  // -inf: no key at all (Lk = 0)
      if (out == nullptr) continue;
      T* o = out + r * D;
      const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
      for (int64_t c = 0; c < D; ++c) o[c] = acc[r * D + c] * inv;
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
      const int64_t b = bh / d.H, h = bh % d.H, hk = h / d.group();
      tile.run(in.q_at(b, h, q0), in.qs[2], in.k_at(b, hk), in.ks[2], in.v_at(b, hk), in.vs[2],
               q0, out + (bh * d.Lq + q0) * d.D, lse + bh * d.Lq + q0);
    }
  });
}

// ----------------------------------------------------------------------------- backward

// Per query tile: the log-sum-exp (recomputed, without the P V product: the public op returns
// only out) and delta = rowsum(dO * O).
template <typename T>
void backward_stats(const Spec& spec, const Dims& d, T scale, Views<T> in, const T* out,
                    const T* gout, T* lse, T* delta) {
  const int64_t nqt = d.q_tiles(), tasks = d.B * d.H * nqt, D = d.D;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ForwardTile<T> fwd(spec, d, scale);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqt, q0 = (task % nqt) * kQ, nq = std::min(kQ, d.Lq - q0);
      const int64_t b = bh / d.H, h = bh % d.H, bhk = b * d.Hk + h / d.group();
      const int64_t row0 = bh * d.Lq + q0;
      fwd.run(in.q + row0 * D, D, in.k + bhk * d.Lk * D, D, in.v + bhk * d.Lk * D, D, q0,
              nullptr, lse + row0);
      const T* go = gout + row0 * D;
      const T* o = out + row0 * D;  // the saved output, as autograd saw it
      for (int64_t r = 0; r < nq; ++r) {
        T acc = 0;
        for (int64_t c = 0; c < D; ++c) acc += go[r * D + c] * o[r * D + c];
        delta[row0 + r] = acc;
      }
    }
  });
}

// Probabilities and dS = P (dP - delta) of one [nq, nk] tile, in place of s and dp.
template <typename T>
void tile_grads(const Row* rows, int64_t nq, int64_t k0, int64_t nk, T scale, const T* lse_t,
                const T* delta_t, T* s, T* dp) {
  for (int64_t r = 0; r < nq; ++r) {
    T* sr = s + r * nk;
    T* dr = dp + r * nk;
    const Row& row = rows[r];
    if (!row.touches(k0, k0 + nk)) {
      std::fill(sr, sr + nk, T(0));
      std::fill(dr, dr + nk, T(0));
      continue;
    }
    probs(sr, nk, scale, lse_t[r]);
    if (!row.covers(k0, k0 + nk)) mask_row(sr, nk, row, k0, T(0));
    softmax_grad(sr, dr, nk, delta_t[r]);
  }
}

// Two-pass backward, pass 1 (per query tile): dQ = scale * sum_tiles dS K.
template <typename T>
void backward_dq(const Spec& spec, const Dims& d, T scale, Views<T> in, const T* gout,
                 const T* lse, const T* delta, T* gq) {
  const int64_t nqt = d.q_tiles(), tasks = d.B * d.H * nqt, D = d.D;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kQ * kK), dp(kQ * kK), kt(D * kK);
    std::vector<Row> rows(kQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqt, q0 = (task % nqt) * kQ, nq = std::min(kQ, d.Lq - q0);
      const int64_t b = bh / d.H, h = bh % d.H, bhk = b * d.Hk + h / d.group();
      const T* q = in.q + (bh * d.Lq + q0) * D;
      const T* k = in.k + bhk * d.Lk * D;
      const T* v = in.v + bhk * d.Lk * D;
      const T* go = gout + (bh * d.Lq + q0) * D;
      const T* lse_t = lse + bh * d.Lq + q0;
      const T* delta_t = delta + bh * d.Lq + q0;
      T* dq = gq + (bh * d.Lq + q0) * D;
      for (int64_t r = 0; r < nq; ++r) rows[r] = spec.row(q0 + r);
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
        tile_grads(rows.data(), nq, k0, nk, scale, lse_t, delta_t, s.data(), dp.data());
        gemm(nq, D, nk, dp.data(), nk, k + k0 * D, D, dq, D, true);
      }
      scale_row(dq, nq * D, scale);
    }
  });
}

// Two-pass backward, pass 2, per key tile of each K/V head: dV = sum P^T dO and
// dK = scale * sum dS^T Q over the query tiles (of every head of the GQA group) that see it.
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

// One pass per (batch, K/V head), used when there are at least as many of those as threads:
// each visited (query tile, key tile) pair computes S and dP once and feeds dQ, dK and dV (5
// products per pair instead of the two passes' 7). Sequential within a task: deterministic.
template <typename T>
void backward_fused(const Spec& spec, const Dims& d, T scale, Views<T> in, const T* gout,
                    const T* lse, const T* delta, T* gq, T* gk, T* gv) {
  const int64_t nqt = d.q_tiles(), nkt = d.k_tiles(), D = d.D, G = d.group();
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(D * kK), vt(D * kK), s(kQ * kK), dp(kQ * kK), tr(kK * kQ);
    std::vector<Row> rows(kQ);
    for (int64_t bhk = begin; bhk < end; ++bhk) {
      const int64_t b = bhk / d.Hk, hk = bhk % d.Hk;
      const T* k = in.k + bhk * d.Lk * D;
      const T* v = in.v + bhk * d.Lk * D;
      T* dk = gk + bhk * d.Lk * D;
      T* dv = gv + bhk * d.Lk * D;
      T* dq_group = gq + (b * d.H + hk * G) * d.Lq * D;  // the group's heads are adjacent
      std::fill(dk, dk + d.Lk * D, T(0));
      std::fill(dv, dv + d.Lk * D, T(0));
      std::fill(dq_group, dq_group + G * d.Lq * D, T(0));
      for (int64_t t = 0; t < nqt; ++t) {
        const int64_t q0 = t * kQ, nq = std::min(kQ, d.Lq - q0);
        for (int64_t r = 0; r < nq; ++r) rows[r] = spec.row(q0 + r);
        const Row env = spec.envelope(q0, q0 + nq);
        int64_t t0, t1;
        block_mask::tile_span(env, kK, nkt, &t0, &t1);
        for (int64_t u = t0; u < t1; ++u) {
          const int64_t k0 = u * kK, nk = std::min(kK, d.Lk - k0);
          if (!env.touches(k0, k0 + nk)) continue;
          transpose(k + k0 * D, kt.data(), nk, D);
          transpose(v + k0 * D, vt.data(), nk, D);
          for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
            const int64_t row0 = (b * d.H + h) * d.Lq + q0;
            const T* q = in.q + row0 * D;
            const T* go = gout + row0 * D;
            gemm(nq, nk, D, q, D, kt.data(), nk, s.data(), nk, false);
            gemm(nq, nk, D, go, D, vt.data(), nk, dp.data(), nk, false);
            tile_grads(rows.data(), nq, k0, nk, scale, lse + row0, delta + row0, s.data(),
                       dp.data());
            transpose(s.data(), tr.data(), nq, nk);  // P^T [nk, nq]
            gemm(nk, D, nq, tr.data(), nq, go, D, dv + k0 * D, D, true);
            transpose(dp.data(), tr.data(), nq, nk);  // dS^T
            gemm(nk, D, nq, tr.data(), nq, q, D, dk + k0 * D, D, true);
            gemm(nq, D, nk, dp.data(), nk, k + k0 * D, D, gq + row0 * D, D, true);
          }
        }
      }
      scale_row(dk, d.Lk * D, scale);
      scale_row(dq_group, G * d.Lq * D, scale);
    }
  });
}

// ------------------------------------------------------------------------------- entry

template <typename T>
Views<T> views(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.const_data_ptr<T>(),
          k.const_data_ptr<T>(),
          v.const_data_ptr<T>(),
          {q.stride(0), q.stride(1), q.stride(2)},
          {k.stride(0), k.stride(1), k.stride(2)},
          {v.stride(0), v.stride(1), v.stride(2)}};
}

// t itself when it already has the compute type, a contiguous head dim and rows at least D
// apart (what the tile products need), else a contiguous copy in the compute type.
at::Tensor in_place_or_copy(const at::Tensor& t, at::ScalarType ct) {
  const int64_t D = t.size(3);
  const bool usable = t.scalar_type() == ct && (t.stride(3) == 1 || D <= 1) && t.stride(2) >= D;
  return usable ? t : t.to(ct).contiguous();
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
  if (q.numel() == 0 || k.numel() == 0) return at::zeros(q.sizes(), q.options());
  if (a.spec.layout == block_mask::Layout::Decode) {
    // No mask, nothing to skip: ATen's attention has less per-call overhead for a few queries.
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, a.scale, d.H != d.Hk)
        .contiguous();
  }
  const auto ct = compute_type(q);
  const auto qc = in_place_or_copy(q, ct), kc = in_place_or_copy(k, ct);
  const auto vc = in_place_or_copy(v, ct);
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
    const T sc = T(a.scale);
    const T* go = gc.const_data_ptr<T>();
    backward_stats<T>(a.spec, d, sc, in, oc.const_data_ptr<T>(), go, lse.mutable_data_ptr<T>(),
                      delta.mutable_data_ptr<T>());
    const T *l = lse.const_data_ptr<T>(), *dl = delta.const_data_ptr<T>();
    T* dq = gq.mutable_data_ptr<T>();
    T* dk = gk.mutable_data_ptr<T>();
    T* dv = gv.mutable_data_ptr<T>();
    if (d.B * d.Hk >= at::get_num_threads()) {
      backward_fused<T>(a.spec, d, sc, in, go, l, dl, dq, dk, dv);
    } else {  // too few heads to keep every thread busy: parallel over tiles
      backward_dq<T>(a.spec, d, sc, in, go, l, dl, dq);
      backward_dkv<T>(a.spec, d, sc, in, go, l, dl, dk, dv);
    }
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
