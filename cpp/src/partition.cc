// Adaptive S2 partitioning: one sort of the leaf ids, then a quadtree descent
// per (tau_min, tau_max) pair with binary searches over the sorted array.
#include "geocell/partition.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "geocell/s2.h"
#include "s2_internal.h"

namespace geocell {

namespace {

// Runs body(thread_index, begin, end) over [0, n) split into contiguous chunks.
template <class F>
void parallel_chunks(size_t n, int threads, size_t min_per_thread, F&& body) {
  size_t t = std::min<size_t>(resolve_threads(threads), std::max<size_t>(1, n / min_per_thread));
  if (t <= 1) {
    body(size_t{0}, size_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t k = 0; k < t; ++k) {
    const size_t b = n * k / t, e = n * (k + 1) / t;
    pool.emplace_back([&body, k, b, e] { body(k, b, e); });
  }
  for (auto& th : pool) th.join();
}

size_t num_chunks(size_t n, int threads, size_t min_per_thread) {
  return std::min<size_t>(resolve_threads(threads), std::max<size_t>(1, n / min_per_thread));
}

// Deepest level at which two leaf ids share an ancestor (-1: different faces).
inline int common_level(uint64_t a, uint64_t b) {
  if (a == b) return kMaxLevel;
  const int high_bit = 63 - __builtin_clzll(a ^ b);
  return high_bit >= 61 ? -1 : (60 - high_bit) / 2;
}

inline uint64_t face_cell(int face) {
  return (static_cast<uint64_t>(face) << 61) | lowest_bit_at_level(0);
}

void emit(PartitionCells& out, uint64_t cell, int level, int64_t lo, int64_t hi) {
  out.cells.push_back(cell);
  out.counts.push_back(hi - lo);
  out.levels.push_back(static_cast<int8_t>(level));
  out.begin.push_back(lo);
  out.end.push_back(hi);
}

// a[lo, hi) (non-empty) are exactly the points of `cell` at `level`.
void descend(const uint64_t* a, int64_t lo, int64_t hi, uint64_t cell, int level,
             const PartitionParams& p, PartitionCells& out) {
  const int64_t count = hi - lo;
  const bool forced = level < p.level_min;
  if (!forced && !(count > p.tau_max && level < p.level_max)) {
    if (count > p.tau_min) emit(out, cell, level, lo, hi);
    return;
  }
  // While every point lies in one child, splitting changes nothing but the
  // level: jump straight to the deepest such level (bounded by where the rule
  // would re-examine the cell).
  const int bound = forced ? p.level_min : p.level_max;
  const int target = std::min(common_level(a[lo], a[hi - 1]), bound);
  if (target > level) {
    descend(a, lo, hi, cell_to_parent(a[lo], target), target, p, out);
    return;
  }
  int64_t child_lo = lo;
  for (int k = 0; k < 4 && child_lo < hi; ++k) {
    const uint64_t child = cell_child(cell, k);
    const int64_t child_hi =
        k == 3 ? hi : std::upper_bound(a + child_lo, a + hi, cell_range_max(child)) - a;
    if (child_hi > child_lo) descend(a, child_lo, child_hi, child, level + 1, p, out);
    child_lo = child_hi;
  }
}

// Face and (i, j) of leaf ids visited in ascending order. The Hilbert decode
// (S2CellId::ToFaceIJOrientation) works 4 levels per table lookup; sorted
// neighbours share most of their high levels, so the decoder keeps the state
// after each lookup and resumes below the shared prefix.
class LeafDecoder {
 public:
  LeafDecoder() : table_(detail::hilbert_tables().ij) {}

  void decode(uint64_t id, int* face, uint32_t* i, uint32_t* j) {
    const uint64_t diff = id ^ prev_;
    prev_ = id;
    // Step k (7..0) reads id bits [8k + 1, 8k + 9) (step 7 also the face).
    int k = 7;
    if (valid_ && (diff >> 61) == 0) {
      const int high = diff == 0 ? 0 : 63 - __builtin_clzll(diff);
      k = high <= 0 ? -1 : std::min(7, (high - 1) / 8);
    }
    valid_ = true;
    if (k == 7) {
      face_ = cell_face(id);
      state_[8] = {0, 0, face_ & 1};
    }
    for (; k >= 0; --k) {
      const int nbits = k == 7 ? kMaxLevel - 7 * detail::kLookupBits : detail::kLookupBits;
      const Decoded& in = state_[k + 1];
      int bits = in.orientation +
                 ((static_cast<int>(id >> (k * 2 * detail::kLookupBits + 1)) &
                   ((1 << (2 * nbits)) - 1))
                  << 2);
      bits = table_[bits];
      state_[k] = {in.i + ((bits >> (detail::kLookupBits + 2)) << (k * detail::kLookupBits)),
                   in.j + (((bits >> 2) & ((1 << detail::kLookupBits) - 1))
                           << (k * detail::kLookupBits)),
                   bits & 3};
    }
    *face = face_;
    *i = static_cast<uint32_t>(state_[0].i);
    *j = static_cast<uint32_t>(state_[0].j);
  }

 private:
  struct Decoded {
    int i, j, orientation;
  };
  const uint16_t* table_;
  Decoded state_[9];
  uint64_t prev_ = 0;
  bool valid_ = false;
  int face_ = 0;
};

// Adds the unit vectors of the leaf-cell centres of sorted ids a[lo, hi) to
// sum. Two phases per block: the branchy integer decode, then a branch-free
// floating-point loop whose square roots and divisions overlap across points.
void add_leaf_centres(const uint64_t* a, size_t lo, size_t hi, LeafDecoder& decoder,
                      double sum[3]) {
  constexpr size_t kBlock = 256;
  int face[kBlock];
  uint32_t fi[kBlock], fj[kBlock];
  double x = 0, y = 0, z = 0;
  for (size_t b = lo; b < hi; b += kBlock) {
    const size_t m = std::min(kBlock, hi - b);
    for (size_t k = 0; k < m; ++k) decoder.decode(a[b + k], &face[k], &fi[k], &fj[k]);
    for (size_t k = 0; k < m; ++k) {
      // Leaf centre: (2i + 1) / 2^31 in s and t, as S2CellId::GetCenterSiTi.
      constexpr double kInvMaxSiTi = 1.0 / 2147483648.0;
      const double u = detail::st_to_uv(kInvMaxSiTi * (2 * fi[k] + 1));
      const double v = detail::st_to_uv(kInvMaxSiTi * (2 * fj[k] + 1));
      double p[3];
      detail::face_uv_to_xyz(face[k], u, v, p);
      const double inv = 1.0 / std::sqrt(1.0 + u * u + v * v);  // |(1, u, v)| in any order
      x += p[0] * inv;
      y += p[1] * inv;
      z += p[2] * inv;
    }
  }
  sum[0] += x;
  sum[1] += y;
  sum[2] += z;
}

// Centroids of all partitionings at once. The cells of all partitionings form
// a laminar family of ranges over the sorted array, so cutting it at every
// cell boundary gives segments of which each cell is a union: each point's
// leaf centre is computed and summed once, whatever the number of partitionings.
void compute_centroids(const uint64_t* a, size_t n, std::vector<PartitionCells>& parts,
                       int threads) {
  std::vector<int64_t> cuts;
  for (const auto& p : parts) {
    cuts.insert(cuts.end(), p.begin.begin(), p.begin.end());
    cuts.insert(cuts.end(), p.end.begin(), p.end.end());
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  if (cuts.size() < 2) {
    for (auto& p : parts) p.centroids.assign(2 * p.cells.size(), 0.0);
    return;
  }
  const size_t n_seg = cuts.size() - 1;
  auto seg_of = [&](int64_t pos) {
    return static_cast<size_t>(std::lower_bound(cuts.begin(), cuts.end(), pos) - cuts.begin());
  };
  // Segments that lie in no cell hold dropped points: skip them.
  std::vector<int32_t> depth(n_seg + 1, 0);
  for (const auto& p : parts) {
    for (size_t c = 0; c < p.cells.size(); ++c) {
      ++depth[seg_of(p.begin[c])];
      --depth[seg_of(p.end[c])];
    }
  }
  for (size_t s = 1; s <= n_seg; ++s) depth[s] += depth[s - 1];

  const size_t chunks = num_chunks(n, threads, size_t{1} << 16);
  std::vector<double> sums(chunks * n_seg * 3, 0.0);
  parallel_chunks(n, threads, size_t{1} << 16, [&](size_t t, size_t b, size_t e) {
    double* mine = sums.data() + t * n_seg * 3;
    LeafDecoder decoder;
    size_t s = std::upper_bound(cuts.begin(), cuts.end(), static_cast<int64_t>(b)) - cuts.begin();
    s = s == 0 ? 0 : s - 1;
    for (; s < n_seg && static_cast<size_t>(cuts[s]) < e; ++s) {
      if (depth[s] == 0) continue;
      const size_t lo = std::max<size_t>(b, cuts[s]), hi = std::min<size_t>(e, cuts[s + 1]);
      add_leaf_centres(a, lo, hi, decoder, mine + 3 * s);
    }
  });
  for (size_t t = 1; t < chunks; ++t) {
    for (size_t k = 0; k < 3 * n_seg; ++k) sums[k] += sums[t * n_seg * 3 + k];
  }
  for (auto& p : parts) {
    p.centroids.resize(2 * p.cells.size());
    for (size_t c = 0; c < p.cells.size(); ++c) {
      double v[3] = {0, 0, 0};
      for (size_t s = seg_of(p.begin[c]), se = seg_of(p.end[c]); s < se; ++s) {
        v[0] += sums[3 * s];
        v[1] += sums[3 * s + 1];
        v[2] += sums[3 * s + 2];
      }
      if (v[0] == 0 && v[1] == 0 && v[2] == 0) cell_to_xyz(p.cells[c], v);  // points cancel out
      p.centroids[2 * c] = (180.0 / M_PI) * std::atan2(v[2], std::sqrt(v[0] * v[0] + v[1] * v[1]));
      p.centroids[2 * c + 1] = (180.0 / M_PI) * std::atan2(v[1], v[0]);
    }
  }
}

// Index of the cell whose range holds `key` (sorted disjoint ranges), or -1.
struct RangeIndex {
  std::vector<uint64_t> rmin, rmax;
  std::vector<uint32_t> bucket_start;  // first range with rmin >= bucket << kShift
  static constexpr int kShift = 48;

  RangeIndex(const uint64_t* cells, size_t n) : rmin(n), rmax(n), bucket_start((1u << 16) + 1) {
    for (size_t k = 0; k < n; ++k) {
      rmin[k] = cell_range_min(cells[k]);
      rmax[k] = cell_range_max(cells[k]);
    }
    size_t k = 0;
    for (size_t b = 0; b <= (1u << 16); ++b) {
      const uint64_t start = b == (1u << 16) ? ~uint64_t{0} : static_cast<uint64_t>(b) << kShift;
      while (k < n && rmin[k] < start) ++k;
      bucket_start[b] = static_cast<uint32_t>(b == (1u << 16) ? n : k);
    }
  }
  // Last range starting at or before key_min, if it also reaches key_max.
  int64_t find(uint64_t key_min, uint64_t key_max) const {
    const size_t b = key_min >> kShift;
    const uint64_t* first = rmin.data() + bucket_start[b];
    const uint64_t* last = rmin.data() + bucket_start[b + 1];
    const int64_t idx = (std::upper_bound(first, last, key_min) - rmin.data()) - 1;
    return idx >= 0 && key_max <= rmax[idx] ? idx : -1;
  }
};

}  // namespace

namespace {

constexpr int kDigitBits = 8;
constexpr int kRadix = 1 << kDigitBits;
// Buckets up to this many keys are finished in cache by LSD passes.
constexpr size_t kCacheSortMax = size_t{1} << 16;

inline unsigned digit(uint64_t x, int shift) { return (x >> shift) & (kRadix - 1); }

void insertion_sort(uint64_t* a, size_t n) {
  for (size_t k = 1; k < n; ++k) {
    const uint64_t x = a[k];
    size_t j = k;
    for (; j > 0 && a[j - 1] > x; --j) a[j] = a[j - 1];
    a[j] = x;
  }
}

// Sorts a[0, n), whose keys agree above bit `shift`, into a (to_a) or b; both
// ranges may be overwritten.
void sort_keys(uint64_t* a, uint64_t* b, size_t n, int shift, bool to_a) {
  if (n <= 48 || shift <= 0) {
    insertion_sort(a, n);
    if (!to_a) std::memcpy(b, a, n * sizeof(uint64_t));
    return;
  }
  const int n_digits = (shift + kDigitBits - 1) / kDigitBits;
  if (n <= kCacheSortMax) {
    // LSD in cache: the histograms of all digits in one pass, then one
    // scatter per digit in which the keys differ, ping-ponging between a and b.
    uint32_t count[8][kRadix];
    std::memset(count, 0, sizeof(count));
    for (size_t k = 0; k < n; ++k) {
      const uint64_t x = a[k];
      for (int d = 0; d < n_digits; ++d) ++count[d][digit(x, d * kDigitBits)];
    }
    uint64_t* src = a;
    uint64_t* dst = b;
    for (int d = 0; d < n_digits; ++d) {
      uint32_t* c = count[d];
      if (c[digit(a[0], d * kDigitBits)] == n) continue;  // all keys agree here
      uint32_t offset = 0;
      for (int v = 0; v < kRadix; ++v) {
        const uint32_t m = c[v];
        c[v] = offset;
        offset += m;
      }
      const int sh = d * kDigitBits;
      for (size_t k = 0; k < n; ++k) dst[c[digit(src[k], sh)]++] = src[k];
      std::swap(src, dst);
    }
    uint64_t* want = to_a ? a : b;
    if (src != want) std::memcpy(want, src, n * sizeof(uint64_t));
    return;
  }
  // MSD on the highest digit in which the keys differ.
  size_t count[kRadix + 1];
  int sh = shift;
  do {
    sh = std::max(0, sh - kDigitBits);
    std::memset(count, 0, sizeof(count));
    for (size_t k = 0; k < n; ++k) ++count[digit(a[k], sh) + 1];
  } while (sh > 0 && count[digit(a[0], sh) + 1] == n);
  for (int d = 0; d < kRadix; ++d) count[d + 1] += count[d];
  size_t pos[kRadix];
  std::memcpy(pos, count, sizeof(pos));
  for (size_t k = 0; k < n; ++k) b[pos[digit(a[k], sh)]++] = a[k];
  for (int d = 0; d < kRadix; ++d) {
    const size_t lo = count[d], hi = count[d + 1];
    if (hi > lo) sort_keys(b + lo, a + lo, hi - lo, sh, !to_a);
  }
}

}  // namespace

namespace {

// Runs body(t) for t in [0, count) on `count` threads (the caller's included).
template <class F>
void run_threads(size_t count, F&& body) {
  std::vector<std::thread> pool;
  for (size_t t = 1; t < count; ++t) pool.emplace_back([&body, t] { body(t); });
  body(size_t{0});
  for (auto& th : pool) th.join();
}

// Position of the highest 8-bit digit in which the keys differ (0 if none).
int top_varying_digit(uint64_t varying) {
  int sh = 64 - kDigitBits;
  while (sh > 0 && ((varying >> sh) & (kRadix - 1)) == 0) sh -= kDigitBits;
  return sh;
}

// Sorts ids[0, n), held as consecutive per-thread ranges bounds[t]..bounds[t+1]
// whose histograms of the digit at `sh` are in hist (kRadix per range); keys
// agree above that digit. One parallel MSD scatter, then the buckets are
// sorted independently, largest first, by the same threads.
void sort_from_top_digit(uint64_t* ids, uint64_t* scratch, size_t n, int sh,
                         const std::vector<size_t>& bounds, std::vector<size_t>& hist) {
  const size_t chunks = bounds.size() - 1;
  std::vector<size_t> bucket_lo(kRadix + 1, 0);
  size_t offset = 0;
  for (int d = 0; d < kRadix; ++d) {
    bucket_lo[d] = offset;
    for (size_t t = 0; t < chunks; ++t) {
      const size_t c = hist[t * kRadix + d];
      hist[t * kRadix + d] = offset;
      offset += c;
    }
  }
  bucket_lo[kRadix] = n;
  run_threads(chunks, [&](size_t t) {
    size_t* pos = hist.data() + t * kRadix;
    for (size_t k = bounds[t]; k < bounds[t + 1]; ++k) scratch[pos[digit(ids[k], sh)]++] = ids[k];
  });
  std::vector<int> order(kRadix);
  for (int d = 0; d < kRadix; ++d) order[d] = d;
  std::sort(order.begin(), order.end(), [&](int x, int y) {
    return bucket_lo[x + 1] - bucket_lo[x] > bucket_lo[y + 1] - bucket_lo[y];
  });
  std::atomic<int> next{0};
  run_threads(chunks, [&](size_t) {
    for (int k; (k = next.fetch_add(1)) < kRadix;) {
      const size_t lo = bucket_lo[order[k]], hi = bucket_lo[order[k] + 1];
      if (hi > lo) sort_keys(scratch + lo, ids + lo, hi - lo, sh, false);
    }
  });
}

// Per-range histograms of the digit at `sh`, in parallel.
void histogram_ranges(const uint64_t* ids, int sh, const std::vector<size_t>& bounds,
                      std::vector<size_t>& hist) {
  std::fill(hist.begin(), hist.end(), 0);
  run_threads(bounds.size() - 1, [&](size_t t) {
    size_t* h = hist.data() + t * kRadix;
    for (size_t k = bounds[t]; k < bounds[t + 1]; ++k) ++h[digit(ids[k], sh)];
  });
}

std::vector<size_t> even_bounds(size_t n, size_t chunks) {
  std::vector<size_t> bounds(chunks + 1);
  for (size_t t = 0; t <= chunks; ++t) bounds[t] = n * t / chunks;
  return bounds;
}

}  // namespace

void sort_cell_ids(uint64_t* ids, uint64_t* scratch, size_t n, int threads) {
  if (n <= kCacheSortMax) {
    sort_keys(ids, scratch, n, 64, true);
    return;
  }
  const size_t chunks = num_chunks(n, threads, size_t{1} << 16);
  const std::vector<size_t> bounds = even_bounds(n, chunks);
  std::vector<uint64_t> varying(chunks, 0);
  run_threads(chunks, [&](size_t t) {
    uint64_t v = 0;
    for (size_t k = bounds[t]; k < bounds[t + 1]; ++k) v |= ids[k] ^ ids[0];
    varying[t] = v;
  });
  uint64_t all = 0;
  for (uint64_t v : varying) all |= v;
  const int sh = top_varying_digit(all);
  std::vector<size_t> hist(chunks * kRadix);
  histogram_ranges(ids, sh, bounds, hist);
  sort_from_top_digit(ids, scratch, n, sh, bounds, hist);
}

std::vector<PartitionCells> partition_sorted_leaves(const uint64_t* a, size_t n,
                                                    const PartitionParams* params,
                                                    size_t n_params, int threads) {
  std::vector<PartitionCells> parts(n_params);
  for (size_t k = 0; k < n_params; ++k) {
    int64_t lo = 0;
    for (int face = 0; face < kNumFaces && lo < static_cast<int64_t>(n); ++face) {
      const uint64_t cell = face_cell(face);
      const int64_t hi = std::upper_bound(a + lo, a + n, cell_range_max(cell)) - a;
      if (hi > lo) descend(a, lo, hi, cell, 0, params[k], parts[k]);
      lo = hi;
    }
  }
  compute_centroids(a, n, parts, threads);
  return parts;
}

int64_t partition_latlng(const double* lat, const double* lng, size_t n,
                         const PartitionParams* params, size_t n_params, bool drop_invalid,
                         int threads, std::vector<PartitionCells>* out, int64_t* n_dropped) {
  *n_dropped = 0;
  std::unique_ptr<uint64_t[]> ids(new uint64_t[std::max<size_t>(n, 1)]);
  // One pass per thread over its rows, block by block while they are in cache:
  // check the coordinates, convert to leaf ids, drop invalid rows (packing the
  // thread's range), and histogram the top digit for the first sort pass.
  constexpr int kTopShift = 64 - kDigitBits;
  const size_t chunks = num_chunks(n, threads, size_t{1} << 16);
  std::vector<size_t> bounds = even_bounds(n, chunks);
  std::vector<size_t> kept(chunks, 0), hist(chunks * kRadix, 0);
  std::vector<int64_t> first_invalid(chunks, -1);
  std::vector<uint64_t> first_key(chunks, 0), varying(chunks, 0);
  run_threads(chunks, [&](size_t t) {
    constexpr size_t kBlock = 4096;
    size_t* h = hist.data() + t * kRadix;
    size_t w = bounds[t];
    uint64_t v = 0, ref = 0;
    bool have_ref = false;
    for (size_t b = bounds[t]; b < bounds[t + 1]; b += kBlock) {
      const size_t m = std::min(kBlock, bounds[t + 1] - b);
      latlng_to_cell_batch(lat + b, lng + b, m, kMaxLevel, ids.get() + b, 1);
      for (size_t k = b; k < b + m; ++k) {
        if (!partition_point_valid(lat[k], lng[k])) {
          if (drop_invalid) continue;
          first_invalid[t] = static_cast<int64_t>(k);
          return;
        }
        const uint64_t id = ids[k];
        if (!have_ref) {
          ref = id;
          have_ref = true;
        }
        v |= id ^ ref;
        ++h[digit(id, kTopShift)];
        ids[w++] = id;
      }
    }
    kept[t] = w - bounds[t];
    first_key[t] = ref;
    varying[t] = v;
  });
  for (int64_t f : first_invalid) {
    if (f >= 0) return f;
  }
  // Pack the threads' ranges together (only moves anything if rows were dropped).
  size_t m = 0;
  uint64_t all = 0;
  bool have_ref = false;
  uint64_t ref = 0;
  for (size_t t = 0; t < chunks; ++t) {
    if (m != bounds[t] && kept[t] > 0)
      std::memmove(ids.get() + m, ids.get() + bounds[t], kept[t] * sizeof(uint64_t));
    bounds[t] = m;
    m += kept[t];
    if (kept[t] > 0) {
      if (!have_ref) {
        ref = first_key[t];
        have_ref = true;
      }
      all |= varying[t] | (first_key[t] ^ ref);
    }
  }
  bounds[chunks] = m;
  *n_dropped = static_cast<int64_t>(n - m);
  {
    std::unique_ptr<uint64_t[]> scratch(new uint64_t[std::max<size_t>(m, 1)]);
    if (m <= kCacheSortMax) {
      sort_keys(ids.get(), scratch.get(), m, 64, true);
    } else {
      const int sh = top_varying_digit(all);
      // All points in one top-digit bucket (a regional data set): histogram the
      // first digit that does vary instead, so the scatter still splits the work.
      if (sh != kTopShift) histogram_ranges(ids.get(), sh, bounds, hist);
      sort_from_top_digit(ids.get(), scratch.get(), m, sh, bounds, hist);
    }
  }
  *out = partition_sorted_leaves(ids.get(), m, params, n_params, threads);
  return -1;
}

void assign_latlng(const uint64_t* cells, size_t n_cells, const double* lat, const double* lng,
                   size_t n, int64_t* out, int threads) {
  const RangeIndex index(cells, n_cells);
  parallel_chunks(n, threads, size_t{1} << 14, [&](size_t, size_t b, size_t e) {
    // Blocks keep the leaf ids in cache and use the vectorised batch kernel.
    constexpr size_t kBlock = 2048;
    uint64_t leaves[kBlock];
    for (size_t k0 = b; k0 < e; k0 += kBlock) {
      const size_t m = std::min(kBlock, e - k0);
      latlng_to_cell_batch(lat + k0, lng + k0, m, kMaxLevel, leaves, 1);
      for (size_t k = 0; k < m; ++k) {
        out[k0 + k] = partition_point_valid(lat[k0 + k], lng[k0 + k])
                          ? index.find(leaves[k], leaves[k])
                          : -1;
      }
    }
  });
}

void assign_cells(const uint64_t* cells, size_t n_cells, const uint64_t* queries, size_t n,
                  int64_t* out, int threads) {
  const RangeIndex index(cells, n_cells);
  parallel_chunks(n, threads, size_t{1} << 14, [&](size_t, size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) {
      const uint64_t q = queries[k];
      out[k] = is_valid_cell(q) ? index.find(cell_range_min(q), cell_range_max(q)) : -1;
    }
  });
}

}  // namespace geocell
