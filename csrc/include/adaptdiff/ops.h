#pragma once
// Backend entry points, one block per op. Schemas: csrc/registration.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace adaptdiff {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index);
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index);

at::Tensor scatter_tokens_cpu(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src);
at::Tensor scatter_tokens_cuda(const at::Tensor& base, const at::Tensor& index, const at::Tensor& src);

void indexed_linear__cpu(at::Tensor& out, const at::Tensor& index, const at::Tensor& x,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias);
void indexed_linear__cuda(at::Tensor& out, const at::Tensor& index, const at::Tensor& x,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias);

at::Tensor patch_scores_cpu(const at::Tensor& v, int64_t patch, c10::string_view metric);
at::Tensor patch_scores_cuda(const at::Tensor& v, int64_t patch, c10::string_view metric);

at::Tensor rel_l1_cpu(const at::Tensor& a, const at::Tensor& b);
at::Tensor rel_l1_cuda(const at::Tensor& a, const at::Tensor& b);

at::Tensor cosine_cpu(const at::Tensor& a, const at::Tensor& b);
at::Tensor cosine_cuda(const at::Tensor& a, const at::Tensor& b);

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& x,
                                                               const at::Tensor& experts,
                                                               int64_t num_experts, int64_t align);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& x,
                                                                const at::Tensor& experts,
                                                                int64_t num_experts,
                                                                int64_t align);

at::Tensor moe_unpermute_cpu(const at::Tensor& y_sorted, const at::Tensor& sorted_src,
                             const at::Tensor& weights);
at::Tensor moe_unpermute_cuda(const at::Tensor& y_sorted, const at::Tensor& sorted_src,
                              const at::Tensor& weights);

at::Tensor block_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               int64_t block_size, c10::string_view layout,
                               std::optional<double> scale);
at::Tensor block_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                int64_t block_size, c10::string_view layout,
                                std::optional<double> scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, int64_t block_size, c10::string_view layout,
    std::optional<double> scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, int64_t block_size, c10::string_view layout,
    std::optional<double> scale);

at::Tensor lincomb_cpu(at::TensorList tensors, at::ArrayRef<double> coeffs);
at::Tensor lincomb_cuda(at::TensorList tensors, at::ArrayRef<double> coeffs);

at::Tensor sara_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& indices,
                           const at::Tensor& values);
at::Tensor sara_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& indices,
                            const at::Tensor& values);

at::Tensor sampled_wgrad_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& indices);
at::Tensor sampled_wgrad_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& indices);

at::Tensor selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& C,
                              const std::optional<at::Tensor>& D_skip,
                              const std::optional<at::Tensor>& z,
                              const std::optional<at::Tensor>& delta_bias, bool delta_softplus);
at::Tensor selective_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& C,
                               const std::optional<at::Tensor>& D_skip,
                               const std::optional<at::Tensor>& z,
                               const std::optional<at::Tensor>& delta_bias, bool delta_softplus);
// (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D_skip, grad_z, grad_delta_bias); the
// gradient of an absent optional input is an empty [0] tensor.
using SelectiveScanGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor>;
SelectiveScanGrads selective_scan_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus);
SelectiveScanGrads selective_scan_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_skip,
    const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    bool delta_softplus);

}  // namespace adaptdiff
