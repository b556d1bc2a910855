#pragma once
// block_attention on the tensor cores (sm_80+, float16/bfloat16, head dims 64 and 128): a
// FlashAttention-2-style forward (online softmax, log-sum-exp kept for the backward) and
// backward (dQ per query tile; dK, dV per key tile summing the GQA group's heads in order, no
// atomics), all products on nvcuda::wmma 16x16x16 fragments with float32 accumulators.
// Status: compiled, not yet run on a GPU. Off unless opted in to (block_attention.cu).
//
// Tiling: a block of 4 warps owns 64 query rows (forward, dQ) or 64 keys (dK/dV), 16 per
// warp, and streams 64-wide tiles of the other side through shared memory. Per (block, tile)
// the layout's envelope skips tiles masked for the whole block; per (warp, tile) the rows'
// closed-form classes (block_mask::row_class, joined by a warp vote: block_mask::tile_class's
// join) pick skip / full (no mask math) / cut (per-element mask). Scores, the softmax and the
// running output live in shared memory as float32 (the accumulator fragments' layout is
// opaque, so rows are rescaled there); P and dS are rounded to the input dtype for the MMAs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "adaptdiff/block_mask.h"

namespace adaptdiff::block_attention_tc {

using block_mask::Row;
using block_mask::Spec;
using block_mask::TileClass;

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // rows owned by a block (queries, or keys for dK/dV)
constexpr int kBN = 64;        // width of a streamed tile
constexpr int kWM = 16;        // rows per warp
constexpr int kPad = 8;        // 16-bit elements of padding per shared row (wmma: ldm % 8 == 0)
constexpr int kFPad = 4;       // float padding per shared row (wmma: ldm % 4 == 0)
constexpr int kSLd = kBN + kFPad;  // float score tiles
constexpr int kPLd = kBN + kPad;   // 16-bit probability tiles
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Geometry {
  Spec spec;
  int64_t B, H, Hk;
  float scale;
};

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// Shared-memory sizes (bytes); every region is a multiple of 128 bytes, so each starts aligned.
template <int D>
constexpr int tile_bytes() { return kBM * (D + kPad) * 2; }  // a [64, D] 16-bit tile
constexpr int score_bytes() { return kBM * kSLd * 4; }
constexpr int prob_bytes() { return kBM * kPLd * 2; }
template <int D>
constexpr int forward_smem() {
  return 3 * tile_bytes<D>() + score_bytes() + prob_bytes() + kBM * (D + kFPad) * 4;
}
template <int D>
constexpr int dq_smem() { return 4 * tile_bytes<D>() + 2 * score_bytes() + prob_bytes(); }
template <int D>
constexpr int dkv_smem() {
  return 4 * tile_bytes<D>() + 2 * score_bytes() + 2 * prob_bytes() + 2 * kBM * 4;
}
// The float staging of a [64, D] result reuses the two score tiles.
static_assert(kBM * (128 + kFPad) * 4 <= 2 * score_bytes(), "staging fits the score tiles");

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ADAPTDIFF_TC_ARCH 1
#endif

#ifdef ADAPTDIFF_TC_ARCH
using namespace nvcuda;
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Rows [r0, r0 + n) of a [L, D] matrix into a [64, D + kPad] shared tile, zero rows >= n.
// 16-byte copies (the host checks the base addresses; D * 2 bytes is a multiple of 16).
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t r0, int64_t n) {
  constexpr int kVec = 8, kPerRow = D / kVec, kLd = D + kPad;
  for (int e = threadIdx.x; e < kBM * kPerRow; e += kThreads) {
    const int r = e / kPerRow, c = (e % kPerRow) * kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < n) val = *reinterpret_cast<const uint4*>(src + (r0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * kLd + c) = val;
  }
}

// out[16 x 64] (float, ld kSLd) = A[16 x D] (rows of a, ld lda) . B[64 x D]^T (rows of b).
template <typename T, int D>
__device__ __forceinline__ void mma_abt(float* out, const T* a, const T* b) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int n = 0; n < kBN / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      FragA<T> fa;
      FragBCol<T> fb;
      wmma::load_matrix_sync(fa, a + kk * 16, kLd);
      wmma::load_matrix_sync(fb, b + n * 16 * kLd + kk * 16, kLd);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, kSLd, wmma::mem_row_major);
  }
}

// acc[n] += P[16 x 64] (ld kPLd) . B[64 x D] (ld D + kPad), n over the D / 16 column blocks.
template <typename T, int D>
__device__ __forceinline__ void mma_pb(FragC (&acc)[D / 16], const T* p, const T* b) {
  constexpr int kLd = D + kPad;
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    FragA<T> fa;
    wmma::load_matrix_sync(fa, p + kk * 16, kPLd);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragBRow<T> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * kLd + n * 16, kLd);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// The warp's class for a tile: every lane holds one row's class (lanes 16-31 repeat 0-15, rows
// past the end repeat the last one); equal classes keep theirs, mixed ones are cut.
__device__ __forceinline__ TileClass warp_class(TileClass mine) {
  const int first = __shfl_sync(0xffffffffu, static_cast<int>(mine), 0);
  return __all_sync(0xffffffffu, static_cast<int>(mine) == first) ? static_cast<TileClass>(first)
                                                                  : TileClass::Cut;
}
#endif  // ADAPTDIFF_TC_ARCH

// ------------------------------------------------------------------------------ forward

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   T* __restrict__ out, float* __restrict__ lse, Geometry g) {
#ifdef ADAPTDIFF_TC_ARCH
  constexpr int kLd = D + kPad, kOLd = D + kFPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + kBM * kLd;
  T* vs = ks + kBN * kLd;
  float* sf = reinterpret_cast<float*>(vs + kBN * kLd);
  T* ps = reinterpret_cast<T*>(sf + kBM * kSLd);
  float* of = reinterpret_cast<float*>(ps + kBM * kPLd);

  const Spec& spec = g.spec;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t bhk = b * g.Hk + h / (g.H / g.Hk);
  const int64_t q0 = int64_t(blockIdx.x) * kBM, q1 = block_mask::min64(spec.Lq, q0 + kBM);
  const T* kh = k + bhk * spec.Lk * D;
  const T* vh = v + bhk * spec.Lk * D;
  load_rows<T, D>(qs, q + bh * spec.Lq * D, q0, q1 - q0);
  for (int e = threadIdx.x; e < kBM * kOLd; e += kThreads) of[e] = 0.0f;
  __syncthreads();  // Q and the zeroed O, even for a block that visits no tile

  // A lane pair owns one of the warp's rows (half: which 32 of the 64 tile columns).
  const int rloc = lane / 2, half = lane % 2, brow = warp * kWM + rloc;
  const int64_t i = q0 + brow;
  const bool valid = i < spec.Lq;
  const Row row = spec.row(valid ? i : q0);
  const int64_t wq0 = q0 + warp * kWM;
  const bool warp_live = wq0 < spec.Lq;
  const Row vote_row = spec.row(block_mask::min64(wq0 + lane % kWM, spec.Lq - 1));
  const float qscale = g.scale * kLog2e;  // scores in the exp2 domain
  float m = -INFINITY, l = 0.0f;

  const int64_t num_tiles = (spec.Lk + kBN - 1) / kBN;
  const Row env = spec.envelope(q0, q1);
  int64_t t0, t1;
  block_mask::tile_span(env, kBN, num_tiles, &t0, &t1);
  float* srow = sf + brow * kSLd + half * 32;
  T* prow = ps + brow * kPLd + half * 32;
  float* orow = of + brow * kOLd + half * (D / 2);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k0 = t * kBN, nk = block_mask::min64(kBN, spec.Lk - k0);
    if (!env.touches(k0, k0 + nk)) continue;  // uniform over the block
    __syncthreads();  // the previous tile's K/V (and, the first time, Q and O) are done
    load_rows<T, D>(ks, kh, k0, nk);
    load_rows<T, D>(vs, vh, k0, nk);
    __syncthreads();
    TileClass cls = warp_live ? warp_class(block_mask::row_class(vote_row, k0, k0 + nk))
                              : TileClass::Skip;
    if (cls == TileClass::Full && nk < kBN) cls = TileClass::Cut;  // padding keys
    if (cls == TileClass::Skip) continue;  // uniform over the warp
    mma_abt<T, D>(sf + warp * kWM * kSLd, qs + warp * kWM * kLd, ks);
    __syncwarp();
    float mx = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      float s = srow[c] * qscale;
      if (cls == TileClass::Cut) {
        const int j = half * 32 + c;
        if (!(j < nk && row.allows(k0 + j))) s = -INFINITY;
      }
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing allowed yet
    const float alpha = exp2f(m - m_use);                   // 0 while m = -inf
    float sum = 0.0f;
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const float p = exp2f(srow[c] - m_use);
      prow[c] = Cvt<T>::from(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) orow[c] *= alpha;
    __syncwarp();
    FragC acc[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::load_matrix_sync(acc[n], of + warp * kWM * kOLd + n * 16, kOLd, wmma::mem_row_major);
    }
    mma_pb<T, D>(acc, ps + warp * kWM * kPLd, vs);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::store_matrix_sync(of + warp * kWM * kOLd + n * 16, acc[n], kOLd, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (!valid) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  T* orow_g = out + (bh * spec.Lq + i) * D + half * (D / 2);
#pragma unroll 8
  for (int c = 0; c < D / 2; ++c) orow_g[c] = Cvt<T>::from(orow[c] * inv);
  if (half == 0 && lse != nullptr) {
    lse[bh * spec.Lq + i] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
#else
  __trap();  // the host never launches it below sm_80
#endif
}

// ----------------------------------------------------------------------------- backward

// log2-domain log-sum-exp of a row for the backward: +inf (probabilities 0) for a row past the
// end or one that saw no key.
__device__ __forceinline__ float lse2_of(const float* lse, int64_t idx, bool valid) {
  const float x = valid ? lse[idx] : -INFINITY;
  return x == -INFINITY ? INFINITY : x * kLog2e;
}

// dQ per 64-row query tile: S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta),
// dQ += dS K; dQ stays in accumulator fragments.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const T* __restrict__ gout, const float* __restrict__ lse,
              const float* __restrict__ delta, T* __restrict__ gq, Geometry g) {
#ifdef ADAPTDIFF_TC_ARCH
  constexpr int kLd = D + kPad, kOLd = D + kFPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* gos = qs + kBM * kLd;
  T* ks = gos + kBM * kLd;
  T* vs = ks + kBN * kLd;
  float* sf = reinterpret_cast<float*>(vs + kBN * kLd);
  float* dpf = sf + kBM * kSLd;
  T* dss = reinterpret_cast<T*>(dpf + kBM * kSLd);

  const Spec& spec = g.spec;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t bhk = b * g.Hk + h / (g.H / g.Hk);
  const int64_t q0 = int64_t(blockIdx.x) * kBM, q1 = block_mask::min64(spec.Lq, q0 + kBM);
  const T* kh = k + bhk * spec.Lk * D;
  const T* vh = v + bhk * spec.Lk * D;
  load_rows<T, D>(qs, q + bh * spec.Lq * D, q0, q1 - q0);
  load_rows<T, D>(gos, gout + bh * spec.Lq * D, q0, q1 - q0);

  const int rloc = lane / 2, half = lane % 2, brow = warp * kWM + rloc;
  const int64_t i = q0 + brow;
  const bool valid = i < spec.Lq;
  const Row row = spec.row(valid ? i : q0);
  const float lse2 = lse2_of(lse, bh * spec.Lq + i, valid);
  const float dlt = valid ? delta[bh * spec.Lq + i] : 0.0f;
  const int64_t wq0 = q0 + warp * kWM;
  const bool warp_live = wq0 < spec.Lq;
  const Row vote_row = spec.row(block_mask::min64(wq0 + lane % kWM, spec.Lq - 1));
  const float qscale = g.scale * kLog2e;

  FragC acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
  const int64_t num_tiles = (spec.Lk + kBN - 1) / kBN;
  const Row env = spec.envelope(q0, q1);
  int64_t t0, t1;
  block_mask::tile_span(env, kBN, num_tiles, &t0, &t1);
  float* srow = sf + brow * kSLd + half * 32;
  float* dprow = dpf + brow * kSLd + half * 32;
  T* dsrow = dss + brow * kPLd + half * 32;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k0 = t * kBN, nk = block_mask::min64(kBN, spec.Lk - k0);
    if (!env.touches(k0, k0 + nk)) continue;
    __syncthreads();
    load_rows<T, D>(ks, kh, k0, nk);
    load_rows<T, D>(vs, vh, k0, nk);
    __syncthreads();
    TileClass cls = warp_live ? warp_class(block_mask::row_class(vote_row, k0, k0 + nk))
                              : TileClass::Skip;
    if (cls == TileClass::Full && nk < kBN) cls = TileClass::Cut;
    if (cls == TileClass::Skip) continue;
    mma_abt<T, D>(sf + warp * kWM * kSLd, qs + warp * kWM * kLd, ks);
    mma_abt<T, D>(dpf + warp * kWM * kSLd, gos + warp * kWM * kLd, vs);
    __syncwarp();
#pragma unroll 8
    for (int c = 0; c < 32; ++c) {
      const int j = half * 32 + c;
      const bool ok = cls == TileClass::Full || (j < nk && row.allows(k0 + j));
      const float p = ok ? exp2f(srow[c] * qscale - lse2) : 0.0f;
      dsrow[c] = Cvt<T>::from(p * (dprow[c] - dlt));
    }
    __syncwarp();
    mma_pb<T, D>(acc, dss + warp * kWM * kPLd, ks);
  }
  __syncthreads();  // the staging below overlaps other warps' score rows
  float* stage = sf;  // [64, D + kFPad] floats over the two score tiles
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage + warp * kWM * kOLd + n * 16, acc[n], kOLd, wmma::mem_row_major);
  }
  __syncwarp();
  if (!valid) return;
  const float* srow_o = stage + brow * kOLd + half * (D / 2);
  T* dst = gq + (bh * spec.Lq + i) * D + half * (D / 2);
#pragma unroll 8
  for (int c = 0; c < D / 2; ++c) dst[c] = Cvt<T>::from(srow_o[c] * g.scale);
#else
  __trap();
#endif
}

// The envelope of every 64-row query tile (the dK/dV kernel's block-level skip test).
__global__ void envelope_kernel(Spec spec, Row* __restrict__ envs, int64_t num_tiles) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < num_tiles) envs[t] = spec.envelope(t * kBM, block_mask::min64(spec.Lq, t * kBM + kBM));
}

// dK, dV per 64-key tile of a K/V head: over the query tiles that see the keys and every head
// of the GQA group (in order), S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T,
// dS^T = P^T (dP^T - delta), dV += P^T dO, dK += dS^T Q; dK and dV stay in fragments.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ gout, const float* __restrict__ lse,
               const float* __restrict__ delta, const Row* __restrict__ envs,
               T* __restrict__ gk, T* __restrict__ gv, Geometry g) {
#ifdef ADAPTDIFF_TC_ARCH
  constexpr int kLd = D + kPad, kOLd = D + kFPad;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kBN * kLd;
  T* qs = vs + kBN * kLd;
  T* gos = qs + kBM * kLd;
  float* stf = reinterpret_cast<float*>(gos + kBM * kLd);
  float* dptf = stf + kBM * kSLd;
  T* pts = reinterpret_cast<T*>(dptf + kBM * kSLd);
  T* dsts = pts + kBM * kPLd;
  float* lse_s = reinterpret_cast<float*>(dsts + kBM * kPLd);
  float* delta_s = lse_s + kBM;

  const Spec& spec = g.spec;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bhk = blockIdx.y, b = bhk / g.Hk, hk = bhk % g.Hk;
  const int64_t group = g.H / g.Hk;
  const int64_t k0 = int64_t(blockIdx.x) * kBN, k1 = block_mask::min64(spec.Lk, k0 + kBN);
  load_rows<T, D>(ks, k + bhk * spec.Lk * D, k0, k1 - k0);
  load_rows<T, D>(vs, v + bhk * spec.Lk * D, k0, k1 - k0);

  const int rloc = lane / 2, half = lane % 2, brow = warp * kWM + rloc;
  const int64_t j = k0 + brow;  // this lane pair's key
  const int64_t wk0 = k0 + warp * kWM, wk1 = block_mask::min64(spec.Lk, wk0 + kWM);
  const bool warp_live = wk0 < spec.Lk;
  const float qscale = g.scale * kLog2e;

  FragC dk[D / 16], dv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dv[n], 0.0f);
  }
  float* strow = stf + brow * kSLd + half * 32;
  float* dptrow = dptf + brow * kSLd + half * 32;
  T* ptrow = pts + brow * kPLd + half * 32;
  T* dstrow = dsts + brow * kPLd + half * 32;
  const int64_t num_q_tiles = (spec.Lq + kBM - 1) / kBM;
  for (int64_t t = 0; t < num_q_tiles; ++t) {
    const int64_t i0 = t * kBM, nq = block_mask::min64(kBM, spec.Lq - i0);
    if (!envs[t].touches(k0, k1)) continue;  // uniform over the block
    // The warp's class: the join over the tile's query rows (two per lane) of its 16 keys.
    TileClass cls = TileClass::Skip;
    if (warp_live) {
      const int64_t ia = i0 + block_mask::min64(lane, nq - 1);
      const int64_t ib = i0 + block_mask::min64(lane + 32, nq - 1);
      const TileClass mine = block_mask::join(block_mask::row_class(spec.row(ia), wk0, wk1),
                                              block_mask::row_class(spec.row(ib), wk0, wk1));
      cls = warp_class(mine);
      if (cls == TileClass::Full && (nq < kBM || wk1 - wk0 < kWM)) cls = TileClass::Cut;
    }
    for (int64_t hh = hk * group; hh < (hk + 1) * group; ++hh) {
      const int64_t bh = b * g.H + hh;
      __syncthreads();
      load_rows<T, D>(qs, q + bh * spec.Lq * D, i0, nq);
      load_rows<T, D>(gos, gout + bh * spec.Lq * D, i0, nq);
      if (threadIdx.x < kBM) {
        const bool in = threadIdx.x < nq;
        lse_s[threadIdx.x] = lse2_of(lse, bh * spec.Lq + i0 + threadIdx.x, in);
        delta_s[threadIdx.x] = in ? delta[bh * spec.Lq + i0 + threadIdx.x] : 0.0f;
      }
      __syncthreads();
      if (cls == TileClass::Skip) continue;  // uniform over the warp
      mma_abt<T, D>(stf + warp * kWM * kSLd, ks + warp * kWM * kLd, qs);
      mma_abt<T, D>(dptf + warp * kWM * kSLd, vs + warp * kWM * kLd, gos);
      __syncwarp();
#pragma unroll 8
      for (int c = 0; c < 32; ++c) {
        const int ii = half * 32 + c;
        const bool ok = cls == TileClass::Full ||
                        (ii < nq && j < spec.Lk && spec.allowed(i0 + ii, j));
        const float p = ok ? exp2f(strow[c] * qscale - lse_s[ii]) : 0.0f;
        ptrow[c] = Cvt<T>::from(p);
        dstrow[c] = Cvt<T>::from(p * (dptrow[c] - delta_s[ii]));
      }
      __syncwarp();
      mma_pb<T, D>(dv, pts + warp * kWM * kPLd, gos);
      mma_pb<T, D>(dk, dsts + warp * kWM * kPLd, qs);
    }
  }
  const bool valid = j < spec.Lk;
  float* stage = stf;  // [64, D + kFPad] floats over the two score tiles
  const float* srow_o = stage + brow * kOLd + half * (D / 2);
  const int64_t off = (bhk * spec.Lk + j) * D + half * (D / 2);
  __syncthreads();
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage + warp * kWM * kOLd + n * 16, dk[n], kOLd, wmma::mem_row_major);
  }
  __syncwarp();
  if (valid) {
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) gk[off + c] = Cvt<T>::from(srow_o[c] * g.scale);
  }
  __syncwarp();
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage + warp * kWM * kOLd + n * 16, dv[n], kOLd, wmma::mem_row_major);
  }
  __syncwarp();
  if (valid) {
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) gv[off + c] = Cvt<T>::from(srow_o[c]);
  }
#else
  __trap();
#endif
}

}  // namespace adaptdiff::block_attention_tc
