#pragma once
// block_attention's mask, shared by the CPU and CUDA kernels: a closed-form predicate of
// (query i, key j, lengths, block size) and the tile arithmetic built on it. Nothing dense is
// ever materialised. Layouts (docs/ops.md: block-attention layouts, tile skipping):
//   block_causal    j // bs <= i // bs                                   (Lq = Lk)
//   bd3             noisy i: own noisy block + clean blocks < block(i);
//                   clean i: clean blocks <= block(i)                    (Lq = Lk = 2n)
//   context_causal  as bd3, but clean i sees clean j <= i (plain causal)  (Lq = Lk = 2n)
//   decode          every key                                            (any Lq, Lk)
// For the training layouts positions < n are the noisy copy, >= n the clean copy, and blocks
// are counted within each half. Every query row then sees the union of at most two key
// intervals [lo0, hi0) u [lo1, hi1), which is all a kernel needs to skip and mask tiles.
#include <cstdint>

#if defined(__CUDACC__)
#define ADAPTDIFF_HD __host__ __device__ __forceinline__
#else
#define ADAPTDIFF_HD inline
#endif

namespace adaptdiff::block_mask {

enum class Layout : int { BlockCausal = 0, Bd3 = 1, ContextCausal = 2, Decode = 3 };

ADAPTDIFF_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
ADAPTDIFF_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The keys one query row may see: [lo0, hi0) u [lo1, hi1), either possibly empty.
struct Row {
  int64_t lo0, hi0, lo1, hi1;
  ADAPTDIFF_HD bool allows(int64_t j) const {
    return (j >= lo0 && j < hi0) || (j >= lo1 && j < hi1);
  }
  ADAPTDIFF_HD bool empty() const { return hi0 <= lo0 && hi1 <= lo1; }
  // Every key of [k0, k1) allowed (no element mask needed in that tile).
  ADAPTDIFF_HD bool covers(int64_t k0, int64_t k1) const {
    return (k0 >= lo0 && k1 <= hi0) || (k0 >= lo1 && k1 <= hi1);
  }
  // Some key of [k0, k1) allowed (the tile must be visited for this row).
  ADAPTDIFF_HD bool touches(int64_t k0, int64_t k1) const {
    return (max64(k0, lo0) < min64(k1, hi0)) || (max64(k0, lo1) < min64(k1, hi1));
  }
};

struct Spec {
  Layout layout;
  int64_t Lq, Lk;
  int64_t bs;  // block size, clamped to [1, max(Lq, Lk)] (a larger one means the same mask)

  ADAPTDIFF_HD Row row(int64_t i) const {
    switch (layout) {
      case Layout::BlockCausal:
        return {0, min64(Lk, (i / bs + 1) * bs), 0, 0};
      case Layout::Decode:
        return {0, Lk, 0, 0};
      default: {
        const int64_t n = Lq / 2;
        if (i < n) {  // noisy: clean blocks before its own, then its own noisy block
          const int64_t b0 = (i / bs) * bs;
          return {n, n + b0, b0, min64(n, b0 + bs)};
        }
        const int64_t c = i - n;
        const int64_t hi = layout == Layout::Bd3 ? n + min64(n, (c / bs + 1) * bs) : i + 1;
        return {n, hi, 0, 0};
      }
    }
  }

  ADAPTDIFF_HD bool allowed(int64_t i, int64_t j) const { return row(i).allows(j); }

  // The envelope of the rows [q0, q1): per interval, the smallest lo and largest hi over the
  // rows where it is non-empty. For every layout each envelope is the exact union of that
  // interval over the rows (prefixes, or consecutive blocks), so a key tile that touches
  // neither envelope interval is masked for every row of the query tile and is skipped.
  ADAPTDIFF_HD Row envelope(int64_t q0, int64_t q1) const {
    Row e{INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
    for (int64_t i = q0; i < q1; ++i) {
      const Row r = row(i);
      if (r.hi0 > r.lo0) e.lo0 = min64(e.lo0, r.lo0), e.hi0 = max64(e.hi0, r.hi0);
      if (r.hi1 > r.lo1) e.lo1 = min64(e.lo1, r.lo1), e.hi1 = max64(e.hi1, r.hi1);
    }
    if (e.hi0 < e.lo0) e.lo0 = e.hi0 = 0;
    if (e.hi1 < e.lo1) e.lo1 = e.hi1 = 0;
    return e;
  }
};

// The key-tile range [t_begin, t_end) worth scanning for a query tile's envelope: tiles outside
// it are masked for all rows; inside, `touches` picks the tiles to visit.
ADAPTDIFF_HD void tile_span(const Row& e, int64_t tile, int64_t num_tiles, int64_t* t_begin,
                            int64_t* t_end) {
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  if (e.hi0 > e.lo0) lo = min64(lo, e.lo0), hi = max64(hi, e.hi0);
  if (e.hi1 > e.lo1) lo = min64(lo, e.lo1), hi = max64(hi, e.hi1);
  if (hi <= lo) {
    *t_begin = *t_end = 0;
    return;
  }
  *t_begin = lo / tile;
  *t_end = min64(num_tiles, (hi + tile - 1) / tile);
}

// A (query tile, key tile) pair's work: skipped (every element masked), full (every element
// allowed: no mask math) or cut (mixed: the mask is applied per element). A row's class is
// exact; a tile's class is the join over its rows (all skip -> skip, all full -> full, else
// cut). Tiles clipped by the sequence end: pass the clipped bounds; a kernel whose key tile is
// clipped masks the padding itself (it treats such a tile as cut). Used by the tensor-core
// kernels per warp (16 query rows) and, through the Python binding, by the tests against
// the dense mask.
enum class TileClass : int { Skip = 0, Full = 1, Cut = 2 };

ADAPTDIFF_HD TileClass row_class(const Row& r, int64_t k0, int64_t k1) {
  if (!r.touches(k0, k1)) return TileClass::Skip;
  return r.covers(k0, k1) ? TileClass::Full : TileClass::Cut;
}

// Join of two row classes (the tile's class so far and one more row's).
ADAPTDIFF_HD TileClass join(TileClass a, TileClass b) { return a == b ? a : TileClass::Cut; }

ADAPTDIFF_HD TileClass tile_class(const Spec& spec, int64_t q0, int64_t q1, int64_t k0,
                                  int64_t k1) {
  TileClass c = row_class(spec.row(q0), k0, k1);
  for (int64_t i = q0 + 1; i < q1 && c != TileClass::Cut; ++i) {
    c = join(c, row_class(spec.row(i), k0, k1));
  }
  return c;
}

}  // namespace adaptdiff::block_mask
