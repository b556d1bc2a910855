// The only TORCH_LIBRARY(adaptdiff, ...) of the project: every schema, grouped by pillar.
// Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; each op's fake kernel and
// autograd in python/adaptdiff/ops/<op>.py, which set_python_module points torch to.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "adaptdiff/block_mask.h"

#define ADAPTDIFF_DEF(m, op, schema) \
  m.set_python_module("adaptdiff.ops." op).def(schema, {at::Tag::pt2_compliant_tag})

TORCH_LIBRARY(adaptdiff, m) {
  // MoE diffusion transformers: token dispatch by expert and the weighted combine back.
  ADAPTDIFF_DEF(m, "moe_permute",
                "moe_permute(Tensor x, Tensor experts, int num_experts, int align=1) -> "
                "(Tensor x_sorted, Tensor sorted_src, Tensor offsets)");
  ADAPTDIFF_DEF(m, "moe_unpermute",
                "moe_unpermute(Tensor y_sorted, Tensor sorted_src, Tensor weights) -> Tensor");

  // Block-diffusion language models: attention under a block mask, tiles skipped, never dense.
  // The backward is its own op (the autograd formula of block_attention calls it).
  ADAPTDIFF_DEF(m, "block_attention",
                "block_attention(Tensor q, Tensor k, Tensor v, int block_size, str layout, "
                "float? scale=None) -> Tensor");
  ADAPTDIFF_DEF(m, "block_attention",
                "block_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
                "Tensor out, int block_size, str layout, float? scale=None) -> "
                "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Training-free acceleration: token selection (RAS), cache refill, fused reductions.
  ADAPTDIFF_DEF(m, "gather_tokens", "gather_tokens(Tensor x, Tensor index) -> Tensor");
  ADAPTDIFF_DEF(m, "scatter_tokens",
                "scatter_tokens(Tensor base, Tensor index, Tensor src) -> Tensor");
  ADAPTDIFF_DEF(m, "indexed_linear_",
                "indexed_linear_(Tensor(a!) out, Tensor index, Tensor x, Tensor weight, "
                "Tensor? bias=None) -> ()");
  ADAPTDIFF_DEF(m, "patch_scores",
                "patch_scores(Tensor v, int patch, str metric=\"std\") -> Tensor");
  ADAPTDIFF_DEF(m, "rel_l1", "rel_l1(Tensor a, Tensor b) -> Tensor");
  ADAPTDIFF_DEF(m, "cosine", "cosine(Tensor a, Tensor b) -> Tensor");
  ADAPTDIFF_DEF(m, "lincomb", "lincomb(Tensor[] tensors, float[] coeffs) -> Tensor");

  // Adaptation: SaRA's sparse trainable entries of a frozen weight.
  ADAPTDIFF_DEF(m, "sara_linear",
                "sara_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices, "
                "Tensor values) -> Tensor");
  ADAPTDIFF_DEF(m, "sampled_wgrad",
                "sampled_wgrad(Tensor grad_out, Tensor x, Tensor indices) -> Tensor");

  // State-space backbones (DiMSUM): Mamba's selective scan; the backward is its own op.
  ADAPTDIFF_DEF(m, "selective_scan",
                "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
                "Tensor? D_skip=None, Tensor? z=None, Tensor? delta_bias=None, "
                "bool delta_softplus=False) -> Tensor");
  ADAPTDIFF_DEF(m, "selective_scan",
                "selective_scan_backward(Tensor grad_out, Tensor u, Tensor delta, Tensor A, "
                "Tensor B, Tensor C, Tensor? D_skip, Tensor? z, Tensor? delta_bias, "
                "bool delta_softplus) -> (Tensor grad_u, Tensor grad_delta, Tensor grad_A, "
                "Tensor grad_B, Tensor grad_C, Tensor grad_D_skip, Tensor grad_z, "
                "Tensor grad_delta_bias)");
}

namespace adaptdiff {
// Whether block_attention's CUDA kernels may take the tensor-core path (compiled, not yet run on
// a GPU): set by adaptdiff.ops' opt-in (ADAPTDIFF_UNVERIFIED_CUDA / unverified_cuda()),
// read by csrc/cuda/block_attention.cu at each call. Off by default.
std::atomic<bool>& block_attention_tensor_cores() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace adaptdiff

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "adaptdiff native library: importing it registers torch.ops.adaptdiff.*";
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = ADAPTDIFF_TORCH_VERSION;
#ifdef ADAPTDIFF_WITH_CUDA
    d["with_cuda"] = true;
#else
    d["with_cuda"] = false;
#endif
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    return d;
  });
  m.def("_set_block_attention_tensor_cores",
        [](bool on) { adaptdiff::block_attention_tensor_cores().store(on); });
  m.def("_block_attention_tensor_cores",
        [] { return adaptdiff::block_attention_tensor_cores().load(); });
  // The tensor-core kernels' per-tile decision (block_mask::tile_class) for every tile pair of
  // a [Lq, Lk] mask: classes[qt][kt] (0 skip, 1 full, 2 cut), tiles clipped at the ends.
  m.def("_block_attention_tile_classes", [](int64_t layout, int64_t Lq, int64_t Lk,
                                             int64_t block_size, int64_t tile_q,
                                             int64_t tile_k) {
    namespace bm = adaptdiff::block_mask;
    const int64_t bs = bm::max64(1, bm::min64(block_size, bm::max64(Lq, Lk)));
    const bm::Spec spec{static_cast<bm::Layout>(layout), Lq, Lk, bs};
    std::vector<std::vector<int>> out;
    for (int64_t q0 = 0; q0 < Lq; q0 += tile_q) {
      std::vector<int> row;
      for (int64_t k0 = 0; k0 < Lk; k0 += tile_k) {
        row.push_back(static_cast<int>(bm::tile_class(spec, q0, bm::min64(Lq, q0 + tile_q), k0,
                                                      bm::min64(Lk, k0 + tile_k))));
      }
      out.push_back(std::move(row));
    }
    return out;
  });
}
