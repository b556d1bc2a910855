#include "adaptdiff/token_checks.h"

#include <vector>

namespace adaptdiff {

void check_index_values_cpu(const char* op, const at::Tensor& index, int64_t n, bool unique) {
  const int64_t B = index.size(0), K = index.size(1);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  std::vector<uint8_t> seen(unique ? n : 0);
  for (int64_t b = 0; b < B; ++b) {
    if (unique) std::fill(seen.begin(), seen.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = idx[b * K + k];
      ADAPTDIFF_CHECK(i >= 0 && i < n, op, "index out of range: index[", b, ", ", k, "] = ", i,
                      " but the token dimension has size ", n);
      if (unique) {
        ADAPTDIFF_CHECK(!seen[i], op, "index must be unique per row, but index[", b,
                        "] repeats token ", i);
        seen[i] = 1;
      }
    }
  }
}

}  // namespace adaptdiff
