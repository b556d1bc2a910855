// cosine on the GPU: <a, b> / max(|a| |b|, 1e-8) per sample (driver in pair_reduce.cuh).
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "pair_reduce.cuh"

namespace adaptdiff {

at::Tensor cosine_cuda(const at::Tensor& a, const at::Tensor& b) {
  return cuda::pair_reduce_cuda<CosineTerms>(a, b);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("cosine", &adaptdiff::cosine_cuda); }
