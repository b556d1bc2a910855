#pragma once
// Row copies for the CPU token kernels. glibc's memcpy takes `rep movsb` for rows of a few KiB,
// which measured ~20% more CPU time than plain vector moves when the destination is freshly
// mapped (a new output tensor, AMD EPYC); a fixed 64-byte memcpy compiles to vector moves.
#include <cstddef>
#include <cstring>

namespace adaptdiff {

inline void copy_row(char* dst, const char* src, size_t bytes) {
  size_t i = 0;
  for (; i + 64 <= bytes; i += 64) std::memcpy(dst + i, src + i, 64);
  if (i < bytes) std::memcpy(dst + i, src + i, bytes - i);
}

}  // namespace adaptdiff
