// block_attention on the GPU (sm_90): the CPU kernel's tiling. A thread block owns 64 query
// rows of one head (4 threads per row, each holding a quarter of the head dim in registers),
// streams the key tiles the layout allows (block_mask.h) through shared memory, and keeps an
// online softmax in float32 (exp2 domain). The backward recomputes the probabilities per tile
// from the log-sum-exp: one kernel for dQ per query tile, one for dK/dV per key tile that sums
// the GQA group's heads in order (deterministic, no atomics). Head dims up to 128 (templates
// 64 and 128, smaller dims zero-padded); any sequence length. "decode" (no mask) forwards to
// ATen's attention.
// Status: correct on an H100 (tests, memcheck), but scalar FMA (SIMT) math reaches 6-10 TFLOP/s
// there, 11-30x slower than SDPA with a dense mask.
// The tensor-core path (block_attention_tc.cuh: float16/bfloat16, head dims 64 and 128, sm_80+,
// compiled, not yet run on a GPU) runs instead only when opted in to: adaptdiff.ops sets the
// flag block_attention_tensor_cores() (csrc/registration.cpp) from ADAPTDIFF_UNVERIFIED_CUDA /
// unverified_cuda() ("block_attention_tc"); every other call, and any shape, dtype or device
// it does not cover, runs the kernels below.
#include <ATen/ops/empty.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>

#include "adaptdiff/block_attention_checks.h"
#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "block_attention_tc.cuh"
#include "common.cuh"

namespace adaptdiff {

std::atomic<bool>& block_attention_tensor_cores();  // csrc/registration.cpp

namespace {

using block_mask::Row;
using block_mask::Spec;

constexpr int kThreads = 256;
constexpr int kTPR = 4;                    // threads per row
constexpr int kRows = kThreads / kTPR;     // query rows (forward, dQ) or keys (dK/dV) per block
constexpr int kTile = 32;                  // keys (forward, dQ) or queries (dK/dV) per smem tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr const char kName[] = "block_attention";  // the dtype dispatch's name (a constant)

struct Geometry {
  Spec spec;
  int64_t B, H, Hk, D;
  float scale;
  __host__ __device__ int64_t group() const { return H / Hk; }
};

template <typename T>
__device__ __forceinline__ float load(const T* p) {
  return static_cast<float>(p[0]);
}

// A [kTile, DM] tile of rows [r0, r0 + n) of a [L, D] matrix into shared memory as float,
// zero outside (rows >= n, columns >= D).
template <typename T, int DM>
__device__ void load_tile(float (*dst)[DM], const T* src, int64_t r0, int64_t n, int64_t D) {
  for (int e = threadIdx.x; e < kTile * DM; e += blockDim.x) {
    const int r = e / DM, c = e % DM;
    dst[r][c] = (r < n && c < D) ? load(src + (r0 + r) * D + c) : 0.0f;
  }
}

// Sum over the kTPR adjacent lanes of one row (all lanes of the warp take part).
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = 1; o < kTPR; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ void tile_range(const Spec& spec, int64_t q0, int64_t q1, int64_t num_tiles,
                           Row* env, int64_t* t0, int64_t* t1) {
  *env = spec.envelope(q0, q1);
  block_mask::tile_span(*env, kTile, num_tiles, t0, t1);
}

// ------------------------------------------------------------------------------ forward

template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   T* __restrict__ out, float* __restrict__ lse, Geometry g) {
  constexpr int DPT = DM / kTPR;
  __shared__ float ks[kTile][DM];
  __shared__ float vs[kTile][DM];
  const Spec& spec = g.spec;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t bhk = b * g.Hk + h / g.group();
  const int64_t q0 = int64_t(blockIdx.x) * kRows, q1 = block_mask::min64(spec.Lq, q0 + kRows);
  const int r = threadIdx.x / kTPR, part = threadIdx.x % kTPR;
  const int64_t i = q0 + r;
  const bool valid = i < spec.Lq;
  const Row row = spec.row(valid ? i : q0);
  const T* kh = k + bhk * spec.Lk * g.D;
  const T* vh = v + bhk * spec.Lk * g.D;

  float qr[DPT], o[DPT];
  const float qscale = g.scale * kLog2e;  // scores in the exp2 domain
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part;
    qr[c] = (valid && d < g.D) ? load(q + (bh * spec.Lq + i) * g.D + d) * qscale : 0.0f;
    o[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;

  Row env;
  int64_t t0, t1;
  const int64_t num_tiles = (spec.Lk + kTile - 1) / kTile;
  tile_range(spec, q0, q1, num_tiles, &env, &t0, &t1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k0 = t * kTile, nk = block_mask::min64(kTile, spec.Lk - k0);
    if (!env.touches(k0, k0 + nk)) continue;  // uniform over the block: a skipped tile
    __syncthreads();
    load_tile<T, DM>(ks, kh, k0, nk, g.D);
    load_tile<T, DM>(vs, vh, k0, nk, g.D);
    __syncthreads();
    float s[kTile];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float partial = 0.0f;
#pragma unroll
      for (int c = 0; c < DPT; ++c) partial += qr[c] * ks[j][c * kTPR + part];
      const float dot = row_sum(partial);
      const bool ok = valid && j < nk && row.allows(k0 + j);
      s[j] = ok ? dot : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    if (mx == -INFINITY) continue;  // nothing allowed for this row here (no barrier below)
    const float m_new = fmaxf(m, mx);
    const float alpha = exp2f(m - m_new);  // 0 while m = -inf
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < DPT; ++c) o[c] *= alpha;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float p = exp2f(s[j] - m_new);
      sum += p;
#pragma unroll
      for (int c = 0; c < DPT; ++c) o[c] += p * vs[j][c * kTPR + part];
    }
    l = l * alpha + sum;
    m = m_new;
  }
  if (!valid) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part;
    if (d < g.D) out[(bh * spec.Lq + i) * g.D + d] = static_cast<T>(o[c] * inv);
  }
  if (part == 0 && lse != nullptr) {
    lse[bh * spec.Lq + i] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
}

// ----------------------------------------------------------------------------- backward

// delta[row] = sum_d dO * O, one warp per row (grid-stride over rows).
template <typename T>
__global__ void delta_kernel(const T* __restrict__ gout, const T* __restrict__ out,
                             float* __restrict__ delta, int64_t rows, int64_t D) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < rows; w += warps) {
    float acc = 0.0f;
    for (int64_t d = lane; d < D; d += 32) acc += load(gout + w * D + d) * load(out + w * D + d);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[w] = acc;
  }
}

// delta = rowsum(grad_out * out) in float32 over `rows` contiguous rows of D, for both
// backward paths.
void launch_delta(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor& delta,
                  int64_t rows, int64_t D) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), kName, [&] {
    delta_kernel<scalar_t><<<cuda::blocks_for(rows * 32, kThreads), kThreads, 0,
                             cuda::stream()>>>(grad_out.const_data_ptr<scalar_t>(),
                                               out.const_data_ptr<scalar_t>(),
                                               delta.mutable_data_ptr<float>(), rows, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dQ per query tile: dS = P (dP - delta), dQ = scale * sum_j dS_j K_j.
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const T* __restrict__ gout, const float* __restrict__ lse,
              const float* __restrict__ delta, T* __restrict__ gq, Geometry g) {
  constexpr int DPT = DM / kTPR;
  __shared__ float ks[kTile][DM];
  __shared__ float vs[kTile][DM];
  const Spec& spec = g.spec;
  const int64_t bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const int64_t bhk = b * g.Hk + h / g.group();
  const int64_t q0 = int64_t(blockIdx.x) * kRows, q1 = block_mask::min64(spec.Lq, q0 + kRows);
  const int r = threadIdx.x / kTPR, part = threadIdx.x % kTPR;
  const int64_t i = q0 + r;
  const bool valid = i < spec.Lq;
  const Row row = spec.row(valid ? i : q0);
  const T* kh = k + bhk * spec.Lk * g.D;
  const T* vh = v + bhk * spec.Lk * g.D;
  const float qscale = g.scale * kLog2e;
  const float lse2 = valid ? lse[bh * spec.Lq + i] * kLog2e : 0.0f;
  const float dlt = valid ? delta[bh * spec.Lq + i] : 0.0f;

  float qr[DPT], gor[DPT], dq[DPT];
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part, off = (bh * spec.Lq + i) * g.D + d;
    const bool in = valid && d < g.D;
    qr[c] = in ? load(q + off) * qscale : 0.0f;
    gor[c] = in ? load(gout + off) : 0.0f;
    dq[c] = 0.0f;
  }
  Row env;
  int64_t t0, t1;
  tile_range(spec, q0, q1, (spec.Lk + kTile - 1) / kTile, &env, &t0, &t1);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t k0 = t * kTile, nk = block_mask::min64(kTile, spec.Lk - k0);
    if (!env.touches(k0, k0 + nk)) continue;
    __syncthreads();
    load_tile<T, DM>(ks, kh, k0, nk, g.D);
    load_tile<T, DM>(vs, vh, k0, nk, g.D);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float ps = 0.0f, pd = 0.0f;
#pragma unroll
      for (int c = 0; c < DPT; ++c) {
        ps += qr[c] * ks[j][c * kTPR + part];
        pd += gor[c] * vs[j][c * kTPR + part];
      }
      const float s = row_sum(ps), dp = row_sum(pd);
      const bool ok = valid && j < nk && row.allows(k0 + j);
      const float p = ok ? exp2f(s - lse2) : 0.0f;
      const float ds = p * (dp - dlt);
#pragma unroll
      for (int c = 0; c < DPT; ++c) dq[c] += ds * ks[j][c * kTPR + part];
    }
  }
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part;
    if (d < g.D) gq[(bh * spec.Lq + i) * g.D + d] = static_cast<T>(dq[c] * g.scale);
  }
}

// The envelope of every kTile-row query tile (the dK/dV kernel's test for skipping one).
__global__ void envelope_kernel(Spec spec, Row* __restrict__ envs, int64_t num_tiles) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < num_tiles) {
    envs[t] = spec.envelope(t * kTile, block_mask::min64(spec.Lq, t * kTile + kTile));
  }
}

// dK, dV per key tile of a K/V head: over every head of the GQA group and every query tile
// that sees the keys, dV += P^T dO and dK += scale * dS^T Q.
template <typename T, int DM>
__global__ void __launch_bounds__(kThreads)
    dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ gout, const float* __restrict__ lse,
               const float* __restrict__ delta, const Row* __restrict__ envs,
               T* __restrict__ gk, T* __restrict__ gv, Geometry g) {
  constexpr int DPT = DM / kTPR;
  __shared__ float qs[kTile][DM];
  __shared__ float gos[kTile][DM];
  __shared__ float lse_s[kTile], delta_s[kTile];
  const Spec& spec = g.spec;
  const int64_t bhk = blockIdx.y, b = bhk / g.Hk, hk = bhk % g.Hk;
  const int64_t k0 = int64_t(blockIdx.x) * kRows, k1 = block_mask::min64(spec.Lk, k0 + kRows);
  const int r = threadIdx.x / kTPR, part = threadIdx.x % kTPR;
  const int64_t j = k0 + r;
  const bool valid = j < spec.Lk;
  const float qscale = g.scale * kLog2e;

  float kr[DPT], vr[DPT], dk[DPT], dv[DPT];
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part, off = (bhk * spec.Lk + j) * g.D + d;
    const bool in = valid && d < g.D;
    kr[c] = in ? load(k + off) * qscale : 0.0f;
    vr[c] = in ? load(v + off) : 0.0f;
    dk[c] = dv[c] = 0.0f;
  }
  const int64_t num_q_tiles = (spec.Lq + kTile - 1) / kTile;
  for (int64_t t = 0; t < num_q_tiles; ++t) {
    const int64_t i0 = t * kTile, nq = block_mask::min64(kTile, spec.Lq - i0);
    if (!envs[t].touches(k0, k1)) continue;  // uniform over the block
    for (int64_t h = hk * g.group(); h < (hk + 1) * g.group(); ++h) {
      const int64_t bh = b * g.H + h;
      __syncthreads();
      load_tile<T, DM>(qs, q + bh * spec.Lq * g.D, i0, nq, g.D);
      load_tile<T, DM>(gos, gout + bh * spec.Lq * g.D, i0, nq, g.D);
      if (threadIdx.x < kTile) {
        const bool in = threadIdx.x < nq;
        lse_s[threadIdx.x] = in ? lse[bh * spec.Lq + i0 + threadIdx.x] * kLog2e : 0.0f;
        delta_s[threadIdx.x] = in ? delta[bh * spec.Lq + i0 + threadIdx.x] : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < kTile; ++ii) {
        float ps = 0.0f, pd = 0.0f;
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
          ps += kr[c] * qs[ii][c * kTPR + part];
          pd += vr[c] * gos[ii][c * kTPR + part];
        }
        const float s = row_sum(ps), dp = row_sum(pd);
        const bool ok = valid && ii < nq && spec.allowed(i0 + ii, j);
        const float p = ok ? exp2f(s - lse_s[ii]) : 0.0f;
        const float ds = p * (dp - delta_s[ii]);
#pragma unroll
        for (int c = 0; c < DPT; ++c) {
          dv[c] += p * gos[ii][c * kTPR + part];
          dk[c] += ds * qs[ii][c * kTPR + part];
        }
      }
    }
  }
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < DPT; ++c) {
    const int64_t d = c * kTPR + part, off = (bhk * spec.Lk + j) * g.D + d;
    if (d < g.D) {
      gk[off] = static_cast<T>(dk[c] * g.scale);
      gv[off] = static_cast<T>(dv[c]);
    }
  }
}

// ------------------------------------------------------------------------------- launch

template <typename F>
void with_head_dim(const char* op, int64_t D, F&& f) {
  ADAPTDIFF_CHECK(D <= 128, op, "q's head dim Dh must be at most 128 on CUDA, got ", D);
  if (D <= 64) {
    f.template operator()<64>();
  } else {
    f.template operator()<128>();
  }
}

Geometry geometry(const BlockAttentionArgs& a) {
  return {a.spec, a.B, a.H, a.Hk, a.D, static_cast<float>(a.scale)};
}

dim3 grid(int64_t length, int64_t heads) {
  ADAPTDIFF_CHECK(heads <= 65535, "block_attention", "q must have B * H <= 65535 on CUDA, got ",
                  heads);
  return dim3(static_cast<unsigned>((length + kRows - 1) / kRows), static_cast<unsigned>(heads));
}

// out and lse (float32 [B, H, Lq]) of the forward.
void launch_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const BlockAttentionArgs& a, at::Tensor& out, float* lse) {
  const Geometry g = geometry(a);
  with_head_dim(op, a.D, [&]<int DM>() {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kName, [&] {
      forward_kernel<scalar_t, DM><<<grid(a.spec.Lq, a.B * a.H), kThreads, 0, cuda::stream()>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), lse, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------- tensor-core path

namespace tc = block_attention_tc;

// The tensor-core kernels' largest shared-memory need for head dim D (dK/dV's).
int tc_smem_need(int64_t D) { return D == 64 ? tc::dkv_smem<64>() : tc::dkv_smem<128>(); }

// Whether this call takes the tensor-core path: opted in to, float16/bfloat16, head dim 64 or
// 128, not "decode", an sm_80+ device with the shared memory the kernels need, and 16-byte
// aligned tensors (the kernels copy 16 bytes at a time). Anything else: the kernels above.
bool use_tensor_cores(const BlockAttentionArgs& a, at::ScalarType dtype,
                      std::initializer_list<const at::Tensor*> tensors) {
  if (!block_attention_tensor_cores().load(std::memory_order_relaxed)) return false;
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (a.D != 64 && a.D != 128) return false;
  if (a.spec.layout == block_mask::Layout::Decode) return false;
  int dev = 0, major = 0, smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (major < 8 || smem < tc_smem_need(a.D)) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<std::uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
  }
  return true;
}

// Calls f.template operator()<T, D>() with the CUDA 16-bit type and the head dim (64 or 128):
// four instantiations per kernel.
template <typename F>
void with_tc_types(at::ScalarType dtype, int64_t D, F&& f) {
  if (dtype == at::kHalf) {
    D == 64 ? f.template operator()<__half, 64>() : f.template operator()<__half, 128>();
  } else {
    D == 64 ? f.template operator()<__nv_bfloat16, 64>()
            : f.template operator()<__nv_bfloat16, 128>();
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

template <typename K>
void allow_smem(K kernel, int bytes) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

dim3 tc_grid(int64_t length, int64_t heads) {
  ADAPTDIFF_CHECK(heads <= 65535, "block_attention", "q must have B * H <= 65535 on CUDA, got ",
                  heads);
  return dim3(static_cast<unsigned>((length + tc::kBM - 1) / tc::kBM),
              static_cast<unsigned>(heads));
}

tc::Geometry tc_geometry(const BlockAttentionArgs& a) {
  return {a.spec, a.B, a.H, a.Hk, static_cast<float>(a.scale)};
}

void launch_forward_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const BlockAttentionArgs& a, at::Tensor& out, float* lse) {
  const tc::Geometry g = tc_geometry(a);
  with_tc_types(q.scalar_type(), a.D, [&]<typename T, int D>() {
    constexpr int bytes = tc::forward_smem<D>();
    allow_smem(tc::forward_kernel<T, D>, bytes);
    tc::forward_kernel<T, D><<<tc_grid(a.spec.Lq, a.B * a.H), tc::kThreads, bytes,
                               cuda::stream()>>>(cptr<T>(q), cptr<T>(k), cptr<T>(v),
                                                 mptr<T>(out), lse, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dq, dk, dv of the tensor-core path, given lse and delta.
void launch_backward_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& gout, const at::Tensor& lse, const at::Tensor& delta,
                        const BlockAttentionArgs& a, at::Tensor& gq, at::Tensor& gk,
                        at::Tensor& gv) {
  const tc::Geometry g = tc_geometry(a);
  const int64_t q_tiles = (a.spec.Lq + tc::kBM - 1) / tc::kBM;
  static_assert(sizeof(Row) == 4 * sizeof(int64_t), "Row is four int64");
  auto envs = at::empty({q_tiles, 4}, q.options().dtype(at::kLong));
  Row* env_ptr = reinterpret_cast<Row*>(envs.mutable_data_ptr<int64_t>());
  tc::envelope_kernel<<<cuda::blocks_for(q_tiles, 128), 128, 0, cuda::stream()>>>(a.spec, env_ptr,
                                                                                  q_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  with_tc_types(q.scalar_type(), a.D, [&]<typename T, int D>() {
    constexpr int dq_bytes = tc::dq_smem<D>(), dkv_bytes = tc::dkv_smem<D>();
    allow_smem(tc::dq_kernel<T, D>, dq_bytes);
    tc::dq_kernel<T, D><<<tc_grid(a.spec.Lq, a.B * a.H), tc::kThreads, dq_bytes,
                          cuda::stream()>>>(cptr<T>(q), cptr<T>(k), cptr<T>(v), cptr<T>(gout),
                                            lse.const_data_ptr<float>(),
                                            delta.const_data_ptr<float>(), mptr<T>(gq), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    allow_smem(tc::dkv_kernel<T, D>, dkv_bytes);
    tc::dkv_kernel<T, D><<<tc_grid(a.spec.Lk, a.B * a.Hk), tc::kThreads, dkv_bytes,
                           cuda::stream()>>>(cptr<T>(q), cptr<T>(k), cptr<T>(v), cptr<T>(gout),
                                             lse.const_data_ptr<float>(),
                                             delta.const_data_ptr<float>(), env_ptr,
                                             mptr<T>(gk), mptr<T>(gv), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor block_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                int64_t block_size, c10::string_view layout,
                                std::optional<double> scale) {
  constexpr const char* op = "block_attention";
  const auto a = check_block_attention_args(op, q, k, v, block_size, layout, scale);
  c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || k.numel() == 0) return at::zeros(q.sizes(), q.options());
  if (a.spec.layout == block_mask::Layout::Decode) {  // no mask: ATen's flash attention
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, a.scale, a.H != a.Hk)
        .contiguous();
  }
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto out = at::empty(q.sizes(), qc.options());
  if (use_tensor_cores(a, q.scalar_type(), {&qc, &kc, &vc, &out})) {
    launch_forward_tc(qc, kc, vc, a, out, nullptr);
  } else {
    launch_forward(op, qc, kc, vc, a, out, nullptr);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, int64_t block_size, c10::string_view layout,
    std::optional<double> scale) {
  constexpr const char* op = "block_attention_backward";
  const auto a = check_block_attention_args(op, q, k, v, block_size, layout, scale);
  check_block_attention_grads(op, grad_out, out, q);
  c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto oc = out.contiguous(), gc = grad_out.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  // The log-sum-exp is recomputed (the public op returns only out): one forward pass.
  auto lse = at::empty({a.B, a.H, a.spec.Lq}, f32);
  auto delta = at::empty({a.B, a.H, a.spec.Lq}, f32);
  auto scratch = at::empty(q.sizes(), qc.options());
  auto gq = at::empty(q.sizes(), qc.options());
  auto gk = at::empty(k.sizes(), kc.options());
  auto gv = at::empty(v.sizes(), vc.options());
  if (use_tensor_cores(a, q.scalar_type(), {&qc, &kc, &vc, &oc, &gc, &scratch, &gq, &gk, &gv})) {
    launch_forward_tc(qc, kc, vc, a, scratch, lse.mutable_data_ptr<float>());
    launch_delta(gc, oc, delta, a.B * a.H * a.spec.Lq, a.D);
    launch_backward_tc(qc, kc, vc, gc, lse, delta, a, gq, gk, gv);
    return {gq, gk, gv};
  }
  launch_forward(op, qc, kc, vc, a, scratch, lse.mutable_data_ptr<float>());
  launch_delta(gc, oc, delta, a.B * a.H * a.spec.Lq, a.D);
  const Geometry g = geometry(a);
  const int64_t q_tiles = (a.spec.Lq + kTile - 1) / kTile;
  static_assert(sizeof(Row) == 4 * sizeof(int64_t), "Row is four int64");
  auto envs = at::empty({q_tiles, 4}, q.options().dtype(at::kLong));
  Row* env_ptr = reinterpret_cast<Row*>(envs.mutable_data_ptr<int64_t>());
  envelope_kernel<<<cuda::blocks_for(q_tiles, 128), 128, 0, cuda::stream()>>>(a.spec, env_ptr,
                                                                              q_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  with_head_dim(op, a.D, [&]<int DM>() {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kName, [&] {
      dq_kernel<scalar_t, DM><<<grid(a.spec.Lq, a.B * a.H), kThreads, 0, cuda::stream()>>>(
          qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
          vc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
          gq.mutable_data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dkv_kernel<scalar_t, DM><<<grid(a.spec.Lk, a.B * a.Hk), kThreads, 0, cuda::stream()>>>(
          qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
          vc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), env_ptr,
          gk.mutable_data_ptr<scalar_t>(), gv.mutable_data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gq, gk, gv};
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("block_attention", &adaptdiff::block_attention_cuda);
  m.impl("block_attention_backward", &adaptdiff::block_attention_backward_cuda);
}
