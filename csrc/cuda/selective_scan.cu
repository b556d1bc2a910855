// selective_scan on the GPU: one warp per (b, d) channel pair, scanning L in order. Lane j owns
// the states n = j, j + 32, ... (N <= 256, at most 8 registers per lane); the output is a warp
// sum. State and sums are float32; B and C are converted once to float32 [B, L, N] so the
// lanes read consecutive n. This kernel is compiled in CI but has not yet run on a GPU.
//
// Backward: the warp re-runs the forward scan and writes the L x N states of its channel to a
// float32 workspace (B*D*L*N floats), then runs the reverse scan of the adjoint state. The sums
// over channels (dB, dC over d; dA, dD_skip, ddelta_bias over b) use float32 atomicAdd, so their
// order, and the last bits of those gradients, vary from run to run (as in Mamba's kernel).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/selective_scan_checks.h"
#include "common.cuh"

namespace adaptdiff {
namespace {

constexpr const char* op = "selective_scan";
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxN = 256;
constexpr int kPerLane = kMaxN / kWarp;

template <typename scalar_t>
struct Params {
  const scalar_t* u;
  const scalar_t* delta;
  const scalar_t* z;  // nullptr: no gate
  const float* A;     // [D, N]
  const float* Bt;    // [B, L, N]
  const float* Ct;    // [B, L, N]
  const float* D_skip;
  const float* bias;
  bool softplus;
  int64_t channels, dim, len;
  int n;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

template <typename scalar_t>
__device__ __forceinline__ float dt_raw(const Params<scalar_t>& p, int64_t i, int64_t d) {
  const float dt = static_cast<float>(p.delta[i]);
  return p.bias ? dt + p.bias[d] : dt;
}

__device__ __forceinline__ float dt_of(float raw, bool softplus) {
  return softplus && raw <= 20.f ? log1pf(expf(raw)) : raw;
}

// Writes out (if not null; gated), the states H[(bd * L + l) * N + k] (if not null) and the
// pre-gate outputs y_pre[bd * L + l] (if not null).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scan_forward(Params<scalar_t> p, scalar_t* out, float* H, float* y_pre) {
  const int64_t bd = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bd >= p.channels) return;  // uniform over the warp
  const int64_t b = bd / p.dim, d = bd % p.dim, n = p.n;
  float a[kPerLane], h[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int k = lane + j * kWarp;
    a[j] = k < n ? p.A[d * n + k] : 0.f;
    h[j] = 0.f;
  }
  for (int64_t l = 0; l < p.len; ++l) {
    const int64_t i = bd * p.len + l;
    const float dt = dt_of(dt_raw(p, i, d), p.softplus);
    const float uv = static_cast<float>(p.u[i]);
    const float dtu = dt * uv;
    const float* bl = p.Bt + (b * p.len + l) * n;
    const float* cl = p.Ct + (b * p.len + l) * n;
    float y = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int k = lane + j * kWarp;
      if (k < n) {
        h[j] = expf(dt * a[j]) * h[j] + dtu * bl[k];
        y += cl[k] * h[j];
        if (H != nullptr) H[i * n + k] = h[j];
      }
    }
    y = warp_sum(y);
    if (p.D_skip) y += p.D_skip[d] * uv;
    if (lane == 0) {
      if (y_pre != nullptr) y_pre[i] = y;
      if (out != nullptr) {
        if (p.z) {
          const float zz = static_cast<float>(p.z[i]);
          y *= zz * sigmoidf(zz);
        }
        out[i] = static_cast<scalar_t>(y);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    scan_backward(Params<scalar_t> p, const scalar_t* grad, const float* H, const float* y_pre,
                  scalar_t* du_out, scalar_t* ddelta_out, scalar_t* dz_out, float* dA, float* dB,
                  float* dC, float* dD, float* dbias) {
  const int64_t bd = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bd >= p.channels) return;
  const int64_t b = bd / p.dim, d = bd % p.dim, n = p.n;
  float a[kPerLane], lam[kPerLane], abar_next[kPerLane], dA_acc[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int k = lane + j * kWarp;
    a[j] = k < n ? p.A[d * n + k] : 0.f;
    lam[j] = abar_next[j] = dA_acc[j] = 0.f;
  }
  float dD_acc = 0.f, dbias_acc = 0.f;
  for (int64_t l = p.len - 1; l >= 0; --l) {
    const int64_t i = bd * p.len + l;
    const float raw = dt_raw(p, i, d);
    const float dt = dt_of(raw, p.softplus);
    const float uv = static_cast<float>(p.u[i]);
    float g = static_cast<float>(grad[i]);
    if (p.z) {
      const float zz = static_cast<float>(p.z[i]);
      const float sig = sigmoidf(zz);
      if (lane == 0) dz_out[i] = static_cast<scalar_t>(g * y_pre[i] * sig * (1.f + zz * (1.f - sig)));
      g *= zz * sig;
    }
    dD_acc += g * uv;
    const float* bl = p.Bt + (b * p.len + l) * n;
    const float* cl = p.Ct + (b * p.len + l) * n;
    float du = 0.f, ddt = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int k = lane + j * kWarp;
      if (k < n) {
        lam[j] = cl[k] * g + abar_next[j] * lam[j];
        const float ab = expf(dt * a[j]);
        const float abh = l > 0 ? ab * H[(i - 1) * n + k] : 0.f;
        const float lam_dt = lam[j] * dt;
        du += lam_dt * bl[k];
        ddt += lam[j] * (bl[k] * uv + a[j] * abh);
        dA_acc[j] += lam_dt * abh;
        atomicAdd(dB + (b * p.len + l) * n + k, lam_dt * uv);
        atomicAdd(dC + (b * p.len + l) * n + k, g * H[i * n + k]);
        abar_next[j] = ab;
      }
    }
    du = warp_sum(du);
    ddt = warp_sum(ddt);
    if (p.softplus && raw <= 20.f) ddt *= sigmoidf(raw);
    dbias_acc += ddt;
    if (lane == 0) {
      du_out[i] = static_cast<scalar_t>(p.D_skip ? du + p.D_skip[d] * g : du);
      ddelta_out[i] = static_cast<scalar_t>(ddt);
    }
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int k = lane + j * kWarp;
    if (k < n) atomicAdd(dA + d * n + k, dA_acc[j]);
  }
  if (lane == 0) {
    atomicAdd(dD + d, dD_acc);
    atomicAdd(dbias + d, dbias_acc);
  }
}

struct Operands {
  at::Tensor A, Bt, Ct, D_skip, delta_bias;
};

Operands prepare(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                 const std::optional<at::Tensor>& D_skip,
                 const std::optional<at::Tensor>& delta_bias) {
  Operands o;
  o.A = A.to(at::kFloat).contiguous();
  o.Bt = B.to(at::kFloat).transpose(1, 2).contiguous();
  o.Ct = C.to(at::kFloat).transpose(1, 2).contiguous();
  if (D_skip) o.D_skip = D_skip->to(at::kFloat).contiguous();
  if (delta_bias) o.delta_bias = delta_bias->to(at::kFloat).contiguous();
  return o;
}

const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

template <typename scalar_t>
Params<scalar_t> make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& z,
                             const Operands& o, bool softplus) {
  Params<scalar_t> p;
  p.u = u.const_data_ptr<scalar_t>();
  p.delta = delta.const_data_ptr<scalar_t>();
  p.z = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
  p.A = o.A.const_data_ptr<float>();
  p.Bt = o.Bt.const_data_ptr<float>();
  p.Ct = o.Ct.const_data_ptr<float>();
  p.D_skip = ptr_or_null(o.D_skip);
  p.bias = ptr_or_null(o.delta_bias);
  p.softplus = softplus;
  p.channels = u.size(0) * u.size(1);
  p.dim = u.size(1);
  p.len = u.size(2);
  p.n = static_cast<int>(o.A.size(1));
  return p;
}

void check_state_size(const char* name, const at::Tensor& A) {
  ADAPTDIFF_CHECK(A.size(1) <= kMaxN, name, "A must have N <= ", kMaxN,
                  " states per channel on CUDA, got N = ", A.size(1));
}

unsigned grid_for(int64_t channels) {
  return static_cast<unsigned>((channels + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

at::Tensor selective_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C,
                               const std::optional<at::Tensor>& D_skip,
                               const std::optional<at::Tensor>& z,
                               const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_selective_scan_args(op, u, delta, A, B, C, D_skip, z, delta_bias);
  check_state_size(op, A);
  c10::cuda::CUDAGuard guard(u.device());
  auto out = at::empty(u.sizes(), u.options());
  if (out.numel() == 0) return out;
  const auto o = prepare(A, B, C, D_skip, delta_bias);
  const auto uc = u.contiguous(), dc = delta.contiguous();
  const auto zc = z ? z->contiguous() : at::Tensor();
  ADAPTDIFF_DISPATCH_FLOATING(u.scalar_type(), "selective_scan_cuda", [&] {
    const auto p = make_params<scalar_t>(uc, dc, zc, o, delta_softplus);
    scan_forward<scalar_t><<<grid_for(p.channels), kThreads, 0, cuda::stream()>>>(
        p, out.mutable_data_ptr<scalar_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

SelectiveScanGrads selective_scan_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus) {
  check_selective_scan_backward_args(grad_out, u, delta, A, B, C, D_skip, z, delta_bias);
  check_state_size("selective_scan_backward", A);
  c10::cuda::CUDAGuard guard(u.device());
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto f32 = u.options().dtype(at::kFloat);
  auto grad_u = at::zeros(u.sizes(), u.options());
  auto grad_delta = at::zeros(u.sizes(), u.options());
  auto grad_z = z ? at::zeros(u.sizes(), u.options()) : at::empty({0}, u.options());
  auto dA = at::zeros({dim, n}, f32), dB = at::zeros({batch, len, n}, f32);
  auto dC = at::zeros({batch, len, n}, f32);
  auto dD = at::zeros({dim}, f32), dbias = at::zeros({dim}, f32);
  if (u.numel() > 0) {
    const auto o = prepare(A, B, C, D_skip, delta_bias);
    const auto uc = u.contiguous(), dc = delta.contiguous(), gc = grad_out.contiguous();
    const auto zc = z ? z->contiguous() : at::Tensor();
    auto H = at::empty({batch * dim * len * n}, f32);
    auto y_pre = z ? at::empty({batch * dim * len}, f32) : at::Tensor();
    ADAPTDIFF_DISPATCH_FLOATING(u.scalar_type(), "selective_scan_backward_cuda", [&] {
      const auto p = make_params<scalar_t>(uc, dc, zc, o, delta_softplus);
      float* y_ptr = z ? y_pre.mutable_data_ptr<float>() : nullptr;
      const unsigned grid = grid_for(p.channels);
      scan_forward<scalar_t><<<grid, kThreads, 0, cuda::stream()>>>(
          p, nullptr, H.mutable_data_ptr<float>(), y_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scan_backward<scalar_t><<<grid, kThreads, 0, cuda::stream()>>>(
          p, gc.const_data_ptr<scalar_t>(), H.const_data_ptr<float>(), y_ptr,
          grad_u.mutable_data_ptr<scalar_t>(), grad_delta.mutable_data_ptr<scalar_t>(),
          z ? grad_z.mutable_data_ptr<scalar_t>() : nullptr, dA.mutable_data_ptr<float>(),
          dB.mutable_data_ptr<float>(), dC.mutable_data_ptr<float>(),
          dD.mutable_data_ptr<float>(), dbias.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_u,
          grad_delta,
          dA.to(A.scalar_type()),
          dB.transpose(1, 2).to(u.scalar_type()).contiguous(),
          dC.transpose(1, 2).to(u.scalar_type()).contiguous(),
          D_skip ? dD.to(D_skip->scalar_type()) : at::empty({0}, u.options()),
          grad_z,
          delta_bias ? dbias.to(delta_bias->scalar_type()) : at::empty({0}, u.options())};
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) {
  m.impl("selective_scan", &adaptdiff::selective_scan_cuda);
  m.impl("selective_scan_backward", &adaptdiff::selective_scan_backward_cuda);
}
