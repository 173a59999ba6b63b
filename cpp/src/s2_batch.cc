// Batch kernels over arrays of points or cells, split across threads.
// latlng_to_cell_batch takes the AVX-512 or AVX2 path where the CPU has it (s2_fast.cc).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "geocell/s2.h"
#include "s2_fast.h"

namespace geocell {

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

bool simd_available() { return detail::avx2_available(); }
void set_simd_enabled(bool enabled) { detail::set_simd_enabled(enabled); }

namespace {
const char* const kSimdNames[] = {"scalar", "avx2", "avx512"};  // by detail::SimdLevel
}  // namespace

std::vector<std::string> simd_levels() {
  std::vector<std::string> names;
  for (int l = static_cast<int>(detail::best_simd_level()); l >= 0; --l) names.emplace_back(kSimdNames[l]);
  return names;
}

std::string simd_level() { return kSimdNames[static_cast<int>(detail::simd_level())]; }

void set_simd_level(const std::string& level) {
  for (int l = 0; l < 3; ++l) {
    if (level == kSimdNames[l] && detail::set_simd_level(static_cast<detail::SimdLevel>(l))) return;
  }
  std::string known;
  for (const auto& name : simd_levels()) known += (known.empty() ? "" : ", ") + name;
  throw std::invalid_argument("simd level must be one of " + known + " on this CPU, got '" + level + "'");
}

namespace {

// Clears the upper halves of the vector registers. Callers (numpy's AVX-512
// kernels, say) can leave them dirty, and then every SSE instruction of the
// scalar code pays for merging them: several times slower.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx"))) void clear_upper_vector_state() {
  if (detail::avx2_available()) __builtin_ia32_vzeroupper();
}
#else
void clear_upper_vector_state() {}
#endif

// Runs body(begin, end) over [0, n) in `threads` chunks (0 = all cores).
template <class F>
void parallel_for(size_t n, int threads, F&& body_in) {
  auto body = [&body_in](size_t b, size_t e) {
    clear_upper_vector_state();
    body_in(b, e);
  };
  // Below this many items a thread costs more than it saves.
  constexpr size_t kMinPerThread = 1 << 15;
  size_t t = std::min<size_t>(resolve_threads(threads), std::max<size_t>(1, n / kMinPerThread));
  if (t <= 1) {
    body(size_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  // Chunks of whole cache lines (8 ids), so aligned outputs stay aligned.
  const size_t chunk = ((n + t - 1) / t + 7) & ~size_t{7};
  // The calling thread takes the first chunk itself.
  for (size_t k = 1; k < t; ++k) {
    const size_t b = k * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&body, b, e] { body(b, e); });
  }
  body(0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}
}  // namespace

void latlng_to_cell_batch(const double* lat, const double* lng, size_t n, int level,
                          uint64_t* out, int threads) {
  const detail::SimdLevel path = detail::simd_level();
  const bool fast = path != detail::SimdLevel::kScalar;
  const bool stream = n >= detail::kStreamOutMin;
  parallel_for(n, threads, [&](size_t b, size_t e) {
    if (fast) {
      detail::latlng_to_cell_fast(path, lat + b, lng + b, e - b, level, out + b, stream);
    } else {
      detail::latlng_to_cell_scalar(lat + b, lng + b, e - b, level, out + b);
    }
  });
}

int64_t latlng_to_cell_batch_checked(const double* lat, const double* lng, size_t n, int level,
                                     uint64_t* out, int threads) {
  const detail::SimdLevel path = detail::simd_level();
  const bool fast = path != detail::SimdLevel::kScalar;
  const bool stream = n >= detail::kStreamOutMin;
  std::atomic<int64_t> first_bad{-1};
  // Each chunk stops at its first bad point; the smallest of those is the
  // first overall.
  auto report = [&first_bad](int64_t index) {
    int64_t seen = first_bad.load();
    while ((seen < 0 || index < seen) && !first_bad.compare_exchange_weak(seen, index)) {
    }
  };
  parallel_for(n, threads, [&](size_t b, size_t e) {
    if (fast) {
      // The fast path checks the few points it hands to the scalar path:
      // invalid points are always among them.
      const int64_t bad = detail::latlng_to_cell_fast(path, lat + b, lng + b, e - b, level, out + b, stream, true);
      if (bad >= 0) report(static_cast<int64_t>(b) + bad);
      return;
    }
    // Checked a slice at a time while the slice is in cache.
    constexpr size_t kSlice = 4096;
    for (size_t s = b; s < e; s += kSlice) {
      const size_t m = std::min(kSlice, e - s);
      const int64_t bad = find_invalid_latlng(lat + s, lng + s, m);
      if (bad >= 0) {
        report(static_cast<int64_t>(s) + bad);
        return;
      }
      detail::latlng_to_cell_scalar(lat + s, lng + s, m, level, out + s);
    }
  });
  return first_bad.load();
}

void cell_to_latlng_batch(const uint64_t* cells, size_t n, double* lat, double* lng,
                          int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) cell_to_latlng(cells[k], &lat[k], &lng[k]);
  });
}

void cell_to_boundary_batch(const uint64_t* cells, size_t n, double* out, int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) cell_to_boundary(cells[k], out + 8 * k);
  });
}

void great_circle_km_batch(const double* lat1, const double* lng1, const double* lat2,
                           const double* lng2, size_t n, double* out, int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) out[k] = great_circle_km(lat1[k], lng1[k], lat2[k], lng2[k]);
  });
}

void cell_to_token_batch(const uint64_t* cells, size_t n, char* out, size_t width) {
  char buf[17];
  for (size_t k = 0; k < n; ++k) {
    const int len = cell_to_token(cells[k], buf);
    char* field = out + k * width;
    std::memcpy(field, buf, static_cast<size_t>(len));
    std::memset(field + len, 0, width - static_cast<size_t>(len));
  }
}

int64_t token_to_cell_batch(const char* tokens, size_t width, size_t n, uint64_t* out) {
  for (size_t k = 0; k < n; ++k) {
    const char* field = tokens + k * width;
    const size_t len = strnlen(field, width);
    // Anything after the first NUL must be padding too.
    for (size_t c = len; c < width; ++c) {
      if (field[c] != '\0') return static_cast<int64_t>(k);
    }
    if (!token_to_cell(field, len, &out[k]) || !is_valid_cell(out[k])) {
      return static_cast<int64_t>(k);
    }
  }
  return -1;
}

}  // namespace geocell
