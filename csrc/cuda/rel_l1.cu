// rel_l1 on the GPU: sum|a - b| / max(sum|b|, 1e-12) per sample (driver in pair_reduce.cuh).
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "pair_reduce.cuh"

namespace adaptdiff {

at::Tensor rel_l1_cuda(const at::Tensor& a, const at::Tensor& b) {
  return cuda::pair_reduce_cuda<RelL1Terms>(a, b);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CUDA, m) { m.impl("rel_l1", &adaptdiff::rel_l1_cuda); }
