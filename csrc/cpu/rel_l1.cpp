// rel_l1: sum|a - b| / max(sum|b|, 1e-12) per sample, one pass (driver in pair_reduce.h).
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "pair_reduce.h"

namespace adaptdiff {

at::Tensor rel_l1_cpu(const at::Tensor& a, const at::Tensor& b) {
  return cpu::pair_reduce_cpu<RelL1Terms>(a, b);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("rel_l1", &adaptdiff::rel_l1_cpu); }
