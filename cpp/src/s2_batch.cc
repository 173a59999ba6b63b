// Batch kernels over arrays of points or cells, split across threads.
// (Plain scalar loops; the vectorised fast path replaces latlng_to_cell_batch.)
#include <algorithm>
#include <thread>
#include <vector>

#include "geocell/s2.h"

namespace geocell {

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

namespace {
template <class F>
void parallel_for(size_t n, int threads, F&& body) {
  // Below this many items a thread costs more than it saves.
  constexpr size_t kMinPerThread = 1 << 15;
  size_t t = std::min<size_t>(resolve_threads(threads), std::max<size_t>(1, n / kMinPerThread));
  if (t <= 1) {
    body(size_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  const size_t chunk = (n + t - 1) / t;
  for (size_t k = 0; k < t; ++k) {
    const size_t b = k * chunk, e = std::min(n, b + chunk);
    if (b < e) pool.emplace_back([&body, b, e] { body(b, e); });
  }
  for (auto& th : pool) th.join();
}
}  // namespace

void latlng_to_cell_batch(const double* lat, const double* lng, size_t n, int level,
                          uint64_t* out, int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) out[k] = latlng_to_cell(lat[k], lng[k], level);
  });
}

void cell_to_latlng_batch(const uint64_t* cells, size_t n, double* lat, double* lng,
                          int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) cell_to_latlng(cells[k], &lat[k], &lng[k]);
  });
}

void great_circle_km_batch(const double* lat1, const double* lng1, const double* lat2,
                           const double* lng2, size_t n, double* out, int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t k = b; k < e; ++k) out[k] = great_circle_km(lat1[k], lng1[k], lat2[k], lng2[k]);
  });
}

}  // namespace geocell
