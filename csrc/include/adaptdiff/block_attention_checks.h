#pragma once
// Argument checks of block_attention and its backward, shared by the CPU and CUDA entry points.
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <string>

#include "adaptdiff/block_mask.h"
#include "adaptdiff/checks.h"

namespace adaptdiff {

struct BlockAttentionArgs {
  block_mask::Spec spec;
  int64_t B, H, Hk, D;
  double scale;
};

inline block_mask::Layout parse_block_layout(const char* op, c10::string_view layout) {
  using block_mask::Layout;
  if (layout == "block_causal") return Layout::BlockCausal;
  if (layout == "bd3") return Layout::Bd3;
  if (layout == "context_causal") return Layout::ContextCausal;
  if (layout == "decode") return Layout::Decode;
  TORCH_CHECK(false, "adaptdiff::", op,
              ": layout must be 'block_causal', 'bd3', 'context_causal' or 'decode', got '",
              std::string(layout.data(), layout.size()), "'");
}

inline BlockAttentionArgs check_block_attention_args(const char* op, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     int64_t block_size,
                                                     c10::string_view layout,
                                                     std::optional<double> scale) {
  using block_mask::Layout;
  check_floating(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_dim(op, "q", q, 4, "[B, H, Lq, Dh]");
  check_dim(op, "k", k, 4, "[B, Hk, Lk, Dh]");
  check_dim(op, "v", v, 4, "[B, Hk, Lk, Dh]");
  const Layout lay = parse_block_layout(op, layout);
  ADAPTDIFF_CHECK(block_size > 0, op, "block_size must be positive, got ", block_size);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2);
  ADAPTDIFF_CHECK(k.size(0) == B && k.size(3) == D, op, "k must have shape [B, Hk, Lk, Dh] with B=",
                  B, " and Dh=", D, " (from q), got ", k.sizes());
  ADAPTDIFF_CHECK(v.sizes() == k.sizes(), op, "v must have the shape of k (", k.sizes(), "), got ",
                  v.sizes());
  ADAPTDIFF_CHECK(Hk > 0 ? H % Hk == 0 : H == 0, op, "k's head count Hk=", Hk,
                  " must divide q's head count H=", H, " (grouped-query attention)");
  if (lay != Layout::Decode) {
    ADAPTDIFF_CHECK(Lk == Lq, op, "k must have the query length Lk = Lq = ", Lq, " for layout '",
                    std::string(layout.data(), layout.size()), "', got Lk=", Lk);
  }
  if (lay == Layout::Bd3 || lay == Layout::ContextCausal) {
    ADAPTDIFF_CHECK(Lq % 2 == 0, op, "q must have an even length 2n ([noisy | clean]) for layout '",
                    std::string(layout.data(), layout.size()), "', got Lq=", Lq);
  }
  const double s = scale.has_value() ? *scale : (D > 0 ? 1.0 / std::sqrt(double(D)) : 1.0);
  ADAPTDIFF_CHECK(std::isfinite(s), op, "scale must be finite, got ", s);
  // A block at least as long as the sequence gives the same mask as the sequence length, and
  // keeps the block arithmetic far from overflow.
  const int64_t longest = std::max<int64_t>({Lq, Lk, int64_t(1)});
  const int64_t bs = std::min(block_size, longest);
  return {block_mask::Spec{lay, Lq, Lk, bs}, B, H, Hk, D, s};
}

inline void check_block_attention_grads(const char* op, const at::Tensor& grad_out,
                                        const at::Tensor& out, const at::Tensor& q) {
  check_same_dtype(op, "grad_out", grad_out, "q", q);
  check_same_dtype(op, "out", out, "q", q);
  check_same_device(op, "grad_out", grad_out, "q", q);
  check_same_device(op, "out", out, "q", q);
  ADAPTDIFF_CHECK(grad_out.sizes() == q.sizes(), op, "grad_out must have the shape of q (",
                  q.sizes(), "), got ", grad_out.sizes());
  ADAPTDIFF_CHECK(out.sizes() == q.sizes(), op, "out must have the shape of q (", q.sizes(),
                  "), got ", out.sizes());
}

}  // namespace adaptdiff
