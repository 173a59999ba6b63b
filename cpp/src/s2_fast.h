// The vectorised lat/lng -> cell path and its scalar twin. Private to the
// core: latlng_to_cell_batch (s2_batch.cc) picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace geocell::detail {

// The paths, worst to best.
enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// True when the CPU (and OS) runs the AVX2/FMA path, and the AVX-512
// (F, DQ, VL, BW) path; checked once, at run time.
bool avx2_available();
bool avx512_available();
SimdLevel best_simd_level();

// The path of every later batch call (tests and benchmarks compare them; the
// default is the best available). set_simd_level returns false, changing
// nothing, for a level this CPU lacks. set_simd_enabled(true) picks the best.
bool set_simd_level(SimdLevel level);
SimdLevel simd_level();
void set_simd_enabled(bool enabled);
bool simd_enabled();

// Cells at `level` for n points, one thread, no validation. The AVX2 version
// must only be called when avx2_available(); both give identical results.
void latlng_to_cell_scalar(const double* lat, const double* lng, size_t n, int level,
                           uint64_t* out);
// stream_out: write ids with non-temporal stores (for outputs larger than
// the caches; used only where out is 32-byte aligned). check: stop at the
// first point find_invalid_latlng would report and return its index (ids
// from there on are not all written); -1 when none (or !check).
int64_t latlng_to_cell_avx2(const double* lat, const double* lng, size_t n, int level,
                            uint64_t* out, bool stream_out = false, bool check = false);
// The same with the AVX-512 stages; only when avx512_available().
int64_t latlng_to_cell_avx512(const double* lat, const double* lng, size_t n, int level,
                              uint64_t* out, bool stream_out = false, bool check = false);
// The given path's kernel (scalar: check first, then convert); the path must
// be available.
int64_t latlng_to_cell_fast(SimdLevel path, const double* lat, const double* lng, size_t n, int level,
                            uint64_t* out, bool stream_out = false, bool check = false);

// Outputs from this many ids on are streamed (2 MiB: beyond L2).
constexpr size_t kStreamOutMin = size_t{1} << 18;

// Leaf ids of (face, i, j) by the AVX2 Hilbert stage; identical to
// face_ij_to_cell. Only when avx2_available().
void face_ij_to_cell_avx2(const uint32_t* face, const uint32_t* i, const uint32_t* j, size_t n,
                          uint64_t* out);

// For tests: how many of the points the last call on this thread of
// latlng_to_cell_avx2 or _avx512 sent back to the scalar path.
size_t avx2_fallback_count();

}  // namespace geocell::detail
