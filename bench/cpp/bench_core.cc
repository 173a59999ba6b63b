// M points/s of latlng_to_cell: scalar path vs the AVX2 path, one thread and
// all threads. Usage: bench_core [n_points]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "geocell/s2.h"
#include "s2_fast.h"

using namespace geocell;

static double mpts(size_t n, int reps, void (*f)(const double*, const double*, size_t, uint64_t*),
                   const double* lat, const double* lng, uint64_t* out) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f(lat, lng, n, out);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  return n / best / 1e6;
}

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 10'000'000;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<double> lat(n), lng(n);
  for (size_t k = 0; k < n; ++k) {
    lat[k] = std::asin(2 * u01(rng) - 1) * (180.0 / M_PI);
    lng[k] = 360.0 * u01(rng) - 180.0;
  }
  std::vector<uint64_t> out(n);
  std::printf("latlng_to_cell, %zu points, M points/s (best of 3)\n", n);
  std::printf("  scalar, 1 thread : %8.1f\n",
              mpts(n, 3, [](const double* a, const double* b, size_t m, uint64_t* o) {
                detail::latlng_to_cell_scalar(a, b, m, 30, o);
              }, lat.data(), lng.data(), out.data()));
  if (detail::avx2_available()) {
    std::printf("  avx2,   1 thread : %8.1f\n",
                mpts(n, 3, [](const double* a, const double* b, size_t m, uint64_t* o) {
                  detail::latlng_to_cell_avx2(a, b, m, 30, o);
                }, lat.data(), lng.data(), out.data()));
  }
  std::printf("  batch, %2d threads: %8.1f\n", resolve_threads(0),
              mpts(n, 3, [](const double* a, const double* b, size_t m, uint64_t* o) {
                latlng_to_cell_batch(a, b, m, 30, o, 0);
              }, lat.data(), lng.data(), out.data()));
  return 0;
}
