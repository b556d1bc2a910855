// selective_scan on the CPU: Mamba's selective scan, one task per (b, d) channel pair over
// at::parallel_for, sequential over L. The N-vector state and every sum are in float32 (float64
// for double inputs). B and C are transposed once to [B, L, N] in that precision, so the inner
// loop over N reads contiguous memory; A, D_skip and delta_bias are converted once too.
//
// The backward (selective_scan_backward) is the reverse scan of the adjoint state
// lambda_l = C_l g_l + exp(dt_{l+1} A) * lambda_{l+1}: per channel it first re-runs the forward
// scan, keeping the L states (L x N, per task), then walks l from L-1 to 0. The gradients that
// sum over channels (B and C over d; A, D_skip and delta_bias over b) go to per-task partial
// buffers that are added in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adaptdiff/dispatch.h"
#include "adaptdiff/ops.h"
#include "adaptdiff/selective_scan_checks.h"

namespace adaptdiff {
namespace {

constexpr const char* op = "selective_scan";
constexpr int64_t kChannelsPerTask = 16;  // backward: channels sharing one partial dB/dC buffer

template <typename acc_t>
inline acc_t softplus(acc_t x) {  // torch.nn.functional.softplus (beta 1, threshold 20)
  return x <= acc_t(20) ? std::log1p(std::exp(x)) : x;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// The small operands in the accumulation precision, contiguous; B and C as [B, L, N].
struct Operands {
  at::Tensor A, Bt, Ct, D_skip, delta_bias;
};

Operands prepare(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                 const std::optional<at::Tensor>& D_skip,
                 const std::optional<at::Tensor>& delta_bias, at::ScalarType acc) {
  Operands o;
  o.A = A.to(acc).contiguous();
  o.Bt = B.to(acc).transpose(1, 2).contiguous();
  o.Ct = C.to(acc).transpose(1, 2).contiguous();
  if (D_skip) o.D_skip = D_skip->to(acc).contiguous();
  if (delta_bias) o.delta_bias = delta_bias->to(acc).contiguous();
  return o;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename scalar_t, typename acc_t>
struct Scan {
  const scalar_t *u, *delta, *z;
  const acc_t *A, *Bt, *Ct, *D_skip, *bias;
  bool softplus;
  int64_t batch, dim, len, n;

  acc_t dt_raw(int64_t bd, int64_t d, int64_t l) const {
    acc_t dt = static_cast<acc_t>(delta[bd * len + l]);
    return bias ? dt + bias[d] : dt;
  }
  acc_t dt_of(acc_t raw) const { return softplus ? adaptdiff::softplus(raw) : raw; }

  // The forward scan of channel (b, d). Writes the output row (out, if not null), the states
  // (H[l * n + k], if not null) and the pre-gate outputs (y_pre, if not null).
  void forward(int64_t b, int64_t d, acc_t* h, scalar_t* out, acc_t* H, acc_t* y_pre) const {
    const int64_t bd = b * dim + d;
    const acc_t* a = A + d * n;
    std::fill(h, h + n, acc_t(0));
    for (int64_t l = 0; l < len; ++l) {
      const acc_t dt = dt_of(dt_raw(bd, d, l));
      const acc_t uv = static_cast<acc_t>(u[bd * len + l]);
      const acc_t dtu = dt * uv;
      const acc_t* bl = Bt + (b * len + l) * n;
      const acc_t* cl = Ct + (b * len + l) * n;
      acc_t y = 0;
      for (int64_t k = 0; k < n; ++k) {
        h[k] = std::exp(dt * a[k]) * h[k] + dtu * bl[k];
        y += cl[k] * h[k];
      }
      if (H) std::copy(h, h + n, H + l * n);
      if (D_skip) y += D_skip[d] * uv;
      if (y_pre) y_pre[l] = y;
      if (out) {
        if (z) {
          const acc_t zz = static_cast<acc_t>(z[bd * len + l]);
          y *= zz * sigmoid(zz);
        }
        out[bd * len + l] = static_cast<scalar_t>(y);
      }
    }
  }
};

template <typename scalar_t>
void forward_kernel(const Scan<scalar_t, at::opmath_type<scalar_t>>& s, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t work = std::max<int64_t>(1, s.len * std::max<int64_t>(1, s.n));
  const int64_t grain = std::max<int64_t>(1, 16384 / work);
  at::parallel_for(0, s.batch * s.dim, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h(s.n);
    for (int64_t bd = begin; bd < end; ++bd) {
      s.forward(bd / s.dim, bd % s.dim, h.data(), out, nullptr, nullptr);
    }
  });
}

template <typename acc_t>
void sum_outer(const acc_t* src, int64_t outer, int64_t inner, acc_t* dst) {
  // dst[i] = sum over o = 0..outer-1 of src[o * inner + i], in o order.
  at::parallel_for(0, inner, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = acc_t(0);
    for (int64_t o = 0; o < outer; ++o) {
      const acc_t* row = src + o * inner;
      for (int64_t i = begin; i < end; ++i) dst[i] += row[i];
    }
  });
}


template <typename scalar_t>
Scan<scalar_t, at::opmath_type<scalar_t>> make_scan(const at::Tensor& u, const at::Tensor& delta,
                                                    const at::Tensor& z, const Operands& o,
                                                    bool delta_softplus) {
  using acc_t = at::opmath_type<scalar_t>;
  Scan<scalar_t, acc_t> s;
  s.u = u.const_data_ptr<scalar_t>();
  s.delta = delta.const_data_ptr<scalar_t>();
  s.z = ptr_or_null<scalar_t>(z);
  s.A = o.A.const_data_ptr<acc_t>();
  s.Bt = o.Bt.const_data_ptr<acc_t>();
  s.Ct = o.Ct.const_data_ptr<acc_t>();
  s.D_skip = ptr_or_null<acc_t>(o.D_skip);
  s.bias = ptr_or_null<acc_t>(o.delta_bias);
  s.softplus = delta_softplus;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.len = u.size(2);
  s.n = o.A.size(1);
  return s;
}

at::ScalarType acc_type(const at::Tensor& u) {
  return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const std::optional<at::Tensor>& D_skip,
                              const std::optional<at::Tensor>& z,
                              const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_selective_scan_args(op, u, delta, A, B, C, D_skip, z, delta_bias);
  auto out = at::empty(u.sizes(), u.options());
  if (out.numel() == 0) return out;
  const auto o = prepare(A, B, C, D_skip, delta_bias, acc_type(u));
  const auto uc = u.contiguous(), dc = delta.contiguous();
  const auto zc = z ? z->contiguous() : at::Tensor();
  ADAPTDIFF_DISPATCH_FLOATING(u.scalar_type(), "selective_scan_cpu", [&] {
    forward_kernel<scalar_t>(make_scan<scalar_t>(uc, dc, zc, o, delta_softplus),
                             out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

SelectiveScanGrads
selective_scan_backward_cpu(const at::Tensor& grad_out, const at::Tensor& u,
                            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
                            const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_selective_scan_backward_args(grad_out, u, delta, A, B, C, D_skip, z, delta_bias);
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), n = A.size(1);
  const auto acc = acc_type(u);
  const auto acc_opts = u.options().dtype(acc);
  auto grad_u = at::empty(u.sizes(), u.options());
  auto grad_delta = at::empty(u.sizes(), u.options());
  auto grad_z = z ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  const int64_t chunks = (dim + kChannelsPerTask - 1) / kChannelsPerTask;
  auto dB_part = at::zeros({batch, chunks, len, n}, acc_opts);
  auto dC_part = at::zeros({batch, chunks, len, n}, acc_opts);
  auto dA_part = at::zeros({batch, dim, n}, acc_opts);
  auto dD_part = at::zeros({batch, dim}, acc_opts);
  auto dbias_part = at::zeros({batch, dim}, acc_opts);
  auto dB = at::zeros({batch, len, n}, acc_opts), dC = at::zeros({batch, len, n}, acc_opts);
  auto dA = at::zeros({dim, n}, acc_opts);
  auto dD = at::zeros({dim}, acc_opts), dbias = at::zeros({dim}, acc_opts);

  if (u.numel() > 0) {
    const auto o = prepare(A, B, C, D_skip, delta_bias, acc);
    const auto uc = u.contiguous(), dc = delta.contiguous(), gc = grad_out.contiguous();
    const auto zc = z ? z->contiguous() : at::Tensor();
    ADAPTDIFF_DISPATCH_FLOATING(u.scalar_type(), "selective_scan_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto s = make_scan<scalar_t>(uc, dc, zc, o, delta_softplus);
      const scalar_t* g_ptr = gc.const_data_ptr<scalar_t>();
      scalar_t* du_ptr = grad_u.mutable_data_ptr<scalar_t>();
      scalar_t* ddelta_ptr = grad_delta.mutable_data_ptr<scalar_t>();
      scalar_t* dz_ptr = z ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* dBp = dB_part.mutable_data_ptr<acc_t>();
      acc_t* dCp = dC_part.mutable_data_ptr<acc_t>();
      acc_t* dAp = dA_part.mutable_data_ptr<acc_t>();
      acc_t* dDp = dD_part.mutable_data_ptr<acc_t>();
      acc_t* dbp = dbias_part.mutable_data_ptr<acc_t>();
      at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> h(n), lam(n), abar_next(n), H(len * n), y_pre(z ? len : 0);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / chunks, c = task % chunks;
          acc_t* dBt = dBp + task * len * n;  // [len, n] of (b, c)
          acc_t* dCt = dCp + task * len * n;
          const int64_t d_end = std::min(dim, (c + 1) * kChannelsPerTask);
          for (int64_t d = c * kChannelsPerTask; d < d_end; ++d) {
            const int64_t bd = b * dim + d;
            const acc_t* a = s.A + d * n;
            s.forward(b, d, h.data(), nullptr, H.data(), z ? y_pre.data() : nullptr);
            std::fill(lam.begin(), lam.end(), acc_t(0));
            std::fill(abar_next.begin(), abar_next.end(), acc_t(0));
            acc_t* dA_row = dAp + bd * n;
            acc_t dD_acc = 0, dbias_acc = 0;
            for (int64_t l = len - 1; l >= 0; --l) {
              const int64_t i = bd * len + l;
              const acc_t raw = s.dt_raw(bd, d, l);
              const acc_t dt = s.dt_of(raw);
              const acc_t uv = static_cast<acc_t>(s.u[i]);
              acc_t g = static_cast<acc_t>(g_ptr[i]);
              if (dz_ptr) {
                const acc_t zz = static_cast<acc_t>(s.z[i]);
                const acc_t sig = sigmoid(zz);
                dz_ptr[i] = static_cast<scalar_t>(g * y_pre[l] * sig * (1 + zz * (1 - sig)));
                g *= zz * sig;
              }
              dD_acc += g * uv;
              acc_t du = s.D_skip ? s.D_skip[d] * g : acc_t(0);
              acc_t ddt = 0;
              const acc_t* bl = s.Bt + (b * len + l) * n;
              const acc_t* cl = s.Ct + (b * len + l) * n;
              const acc_t* hl = H.data() + l * n;
              const acc_t* hp = l > 0 ? H.data() + (l - 1) * n : nullptr;
              acc_t* dBl = dBt + l * n;
              acc_t* dCl = dCt + l * n;
              for (int64_t k = 0; k < n; ++k) {
                lam[k] = cl[k] * g + abar_next[k] * lam[k];
                const acc_t ab = std::exp(dt * a[k]);
                const acc_t abh = hp ? ab * hp[k] : acc_t(0);
                const acc_t lam_dt = lam[k] * dt;
                du += lam_dt * bl[k];
                ddt += lam[k] * (bl[k] * uv + a[k] * abh);
                dA_row[k] += lam_dt * abh;
                dBl[k] += lam_dt * uv;
                dCl[k] += g * hl[k];
                abar_next[k] = ab;
              }
              if (s.softplus && raw <= acc_t(20)) ddt *= sigmoid(raw);
              dbias_acc += ddt;
              du_ptr[i] = static_cast<scalar_t>(du);
              ddelta_ptr[i] = static_cast<scalar_t>(ddt);
            }
            dDp[bd] = dD_acc;
            dbp[bd] = dbias_acc;
          }
        }
      });
      // The fixed-order sums over channels (dB, dC) and over the batch (dA, dD, dbias).
      for (int64_t b = 0; b < batch; ++b) {
        sum_outer(dBp + b * chunks * len * n, chunks, len * n,
                  dB.mutable_data_ptr<acc_t>() + b * len * n);
        sum_outer(dCp + b * chunks * len * n, chunks, len * n,
                  dC.mutable_data_ptr<acc_t>() + b * len * n);
      }
      sum_outer(dAp, batch, dim * n, dA.mutable_data_ptr<acc_t>());
      sum_outer(dDp, batch, dim, dD.mutable_data_ptr<acc_t>());
      sum_outer(dbp, batch, dim, dbias.mutable_data_ptr<acc_t>());
    });
  } else if (z) {
    grad_z.zero_();
  }
  if (u.numel() == 0) {
    grad_u.zero_();
    grad_delta.zero_();
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

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) {
  m.impl("selective_scan", &adaptdiff::selective_scan_cpu);
  m.impl("selective_scan_backward", &adaptdiff::selective_scan_backward_cpu);
}
