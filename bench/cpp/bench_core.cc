// M points/s of latlng_to_cell: scalar path vs the AVX2 and AVX-512 paths, one thread and
// all threads. Usage: bench_core [n_points]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "geocell/s2.h"
#include "s2_fast.h"

using namespace geocell;

// Best of many short passes over slices of 64k points for ~2 s: the machine
// may be shared, and the best pass is the least disturbed one.
static double mpts(size_t n, void (*f)(const double*, const double*, size_t, uint64_t*),
                   const double* lat, const double* lng, uint64_t* out) {
  const size_t slice = std::min<size_t>(n, 1 << 16);
  double best = 1e30;
  const auto start = std::chrono::steady_clock::now();
  for (size_t b = 0; std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 2.0;
       b = (b + slice + slice <= n) ? b + slice : 0) {
    const auto t0 = std::chrono::steady_clock::now();
    f(lat + b, lng + b, slice, out + b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  return slice / best / 1e6;
}

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4'000'000;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<double> lat(n), lng(n);
  for (size_t k = 0; k < n; ++k) {
    lat[k] = std::asin(2 * u01(rng) - 1) * (180.0 / M_PI);
    lng[k] = 360.0 * u01(rng) - 180.0;
  }
  std::vector<uint64_t> out(n);
  std::printf("latlng_to_cell, %zu points, M points/s (best 64k-point pass in 2 s)\n", n);
  std::printf("  scalar, 1 thread : %8.1f\n",
              mpts(n, [](const double* a, const double* b, size_t m, uint64_t* o) {
                detail::latlng_to_cell_scalar(a, b, m, 30, o);
              }, lat.data(), lng.data(), out.data()));
  if (detail::avx2_available()) {
    std::printf("  avx2,   1 thread : %8.1f\n",
                mpts(n, [](const double* a, const double* b, size_t m, uint64_t* o) {
                  detail::latlng_to_cell_avx2(a, b, m, 30, o);
                }, lat.data(), lng.data(), out.data()));
  }
  if (detail::avx512_available()) {
    std::printf("  avx512, 1 thread : %8.1f\n",
                mpts(n, [](const double* a, const double* b, size_t m, uint64_t* o) {
                  detail::latlng_to_cell_avx512(a, b, m, 30, o);
                }, lat.data(), lng.data(), out.data()));
  }
  for (const std::string& path : simd_levels()) {
    if (path == "scalar") continue;
    set_simd_level(path);
    const char* name = path.c_str();
    // Whole arrays at once: memory traffic and page faults of a fresh output.
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
      std::vector<uint64_t> fresh(n);
      const auto t0 = std::chrono::steady_clock::now();
      latlng_to_cell_batch(lat.data(), lng.data(), n, 30, fresh.data(), 1);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("  %-6s, 1 thread, whole %zu-point array: %8.1f\n", name, n, n / best / 1e6);
    // As the Python API calls it: points checked slice by slice on the way.
    best = 1e30;
    for (int r = 0; r < 5; ++r) {
      std::vector<uint64_t> fresh(n + 2);
      const auto t0 = std::chrono::steady_clock::now();
      latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30, fresh.data() + 2, 1);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("  %-6s, 1 thread, whole array, checked: %8.1f\n", name, n / best / 1e6);
    // The same into one reused output (no page faults): the out= case.
    std::vector<uint64_t> reused(n + 2);
    best = 1e30;
    for (int r = 0; r < 6; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30, reused.data() + 2, 1);
      if (r > 0) best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("  %-6s, 1 thread, whole array, checked, reused output: %8.1f\n", name, n / best / 1e6);
  }
  set_simd_enabled(true);
  std::printf("  batch, %2d threads: %8.1f\n", resolve_threads(0),
              mpts(n, [](const double* a, const double* b, size_t m, uint64_t* o) {
                latlng_to_cell_batch(a, b, m, 30, o, 0);
              }, lat.data(), lng.data(), out.data()));
  return 0;
}
