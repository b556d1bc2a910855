// cosine: <a, b> / max(|a| |b|, 1e-8) per sample, one pass (driver in pair_reduce.h).
#include <torch/library.h>

#include "adaptdiff/ops.h"
#include "pair_reduce.h"

namespace adaptdiff {

at::Tensor cosine_cpu(const at::Tensor& a, const at::Tensor& b) {
  return cpu::pair_reduce_cpu<CosineTerms>(a, b);
}

}  // namespace adaptdiff

TORCH_LIBRARY_IMPL(adaptdiff, CPU, m) { m.impl("cosine", &adaptdiff::cosine_cpu); }
