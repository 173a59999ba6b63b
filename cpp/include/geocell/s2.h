// S2 cell arithmetic, bit-exact with Google's s2geometry (v0.12 and later).
//
// Cell ids are 64-bit: 3 face bits, then 2 bits per level along the Hilbert
// curve of the face, then a single 1 bit that marks the level. This header is
// the whole public surface of the S2 part of the core; it knows nothing of
// Python and allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace geocell {

constexpr int kMaxLevel = 30;
constexpr int kNumFaces = 6;

// ---- scalar, one cell or point at a time -----------------------------------

// Leaf (level 30) cell or its parent at `level` containing the point given in
// degrees. Longitudes outside [-180, 180] are accepted (they wrap, as in S2);
// callers validate latitude range and finiteness (see find_invalid_latlng).
uint64_t latlng_to_cell(double lat_deg, double lng_deg, int level = kMaxLevel);

// Unit-free direction (x, y, z) of a point given in degrees, as S2 computes it.
void latlng_to_xyz(double lat_deg, double lng_deg, double xyz[3]);

// Leaf cell containing a direction (need not be unit length).
uint64_t xyz_to_cell(const double xyz[3]);

inline bool is_valid_cell(uint64_t id) {
  // Face 0..5 and exactly one level marker at an even bit offset.
  return (id >> 61) < kNumFaces && (id & (~id + 1) & 0x1555555555555555ULL) != 0;
}
inline uint64_t lowest_bit(uint64_t id) { return id & (~id + 1); }
inline int cell_level(uint64_t id) { return kMaxLevel - (__builtin_ctzll(id) >> 1); }
inline int cell_face(uint64_t id) { return static_cast<int>(id >> 61); }
inline uint64_t lowest_bit_at_level(int level) { return 1ULL << (2 * (kMaxLevel - level)); }
inline uint64_t cell_to_parent(uint64_t id, int level) {
  const uint64_t lsb = lowest_bit_at_level(level);
  return (id & (~lsb + 1)) | lsb;
}
inline uint64_t cell_range_min(uint64_t id) { return id - (lowest_bit(id) - 1); }
inline uint64_t cell_range_max(uint64_t id) { return id + (lowest_bit(id) - 1); }
inline bool cell_contains(uint64_t a, uint64_t b) {
  return b >= cell_range_min(a) && b <= cell_range_max(a);
}
// Child k (0..3, Hilbert order) of a cell above level 30.
inline uint64_t cell_child(uint64_t id, int k) {
  const uint64_t lsb = lowest_bit(id);
  return id - lsb + (lsb >> 2) + static_cast<uint64_t>(k) * (lsb >> 1);
}

// Face and (i, j) leaf coordinates in [0, 2^30) of a cell's first leaf, as in
// S2CellId::ToFaceIJOrientation.
int cell_to_face_ij(uint64_t id, int* i, int* j);
uint64_t face_ij_to_cell(int face, int i, int j);

// Cell centre in degrees (S2CellId::ToLatLng of the raw centre point).
void cell_to_latlng(uint64_t id, double* lat_deg, double* lng_deg);
// Cell centre as an unnormalised direction (S2CellId::ToPointRaw).
void cell_to_xyz(uint64_t id, double xyz[3]);

// The four vertices (lat, lng) in degrees, counter-clockwise seen from
// outside the sphere, starting at the (u, v) lower-left corner.
void cell_to_boundary(uint64_t id, double latlng[8]);

// Shortest hex token ("X" for 0). Writes at most 16 chars + NUL into out.
int cell_to_token(uint64_t id, char out[17]);
// Parses a token; returns false for anything that is not 1..16 hex digits.
bool token_to_cell(const char* token, size_t len, uint64_t* id);

// Haversine great-circle distance in km on a sphere of radius 6371.0 km.
double great_circle_km(double lat1, double lng1, double lat2, double lng2);

// ---- batch kernels ----------------------------------------------------------
// `threads` = 0 uses every hardware thread. Batch kernels never validate; the
// find_* helpers return the first offending index or -1.

void latlng_to_cell_batch(const double* lat, const double* lng, size_t n, int level,
                          uint64_t* out, int threads = 0);
// latlng_to_cell_batch that checks the points as find_invalid_latlng does,
// slice by slice; returns the first invalid index (then `out` is partly
// written) or -1.
int64_t latlng_to_cell_batch_checked(const double* lat, const double* lng, size_t n, int level,
                                     uint64_t* out, int threads = 0);
void cell_to_latlng_batch(const uint64_t* cells, size_t n, double* lat, double* lng,
                          int threads = 0);
// Vertices of each cell, 8 doubles per cell (as cell_to_boundary).
void cell_to_boundary_batch(const uint64_t* cells, size_t n, double* out, int threads = 0);
void great_circle_km_batch(const double* lat1, const double* lng1, const double* lat2,
                           const double* lng2, size_t n, double* out, int threads = 0);

// Tokens into fixed-width fields of `width` >= 16 chars, NUL-padded.
void cell_to_token_batch(const uint64_t* cells, size_t n, char* out, size_t width);
// Parses n NUL-padded fields of `width` chars; returns the first index whose
// field is not the token of a valid cell, or -1 (then out holds every id).
int64_t token_to_cell_batch(const char* tokens, size_t width, size_t n, uint64_t* out);

// First index whose latitude is not finite or outside [-90, 90], or whose
// longitude is not finite; -1 when all are valid.
int64_t find_invalid_latlng(const double* lat, const double* lng, size_t n);
int64_t find_invalid_cell(const uint64_t* cells, size_t n);

// Number of worker threads `threads` resolves to.
int resolve_threads(int threads);

// Whether this CPU can take a vector path (AVX2/FMA or AVX-512) of
// latlng_to_cell_batch, and a switch between the best one and the scalar path
// (results are identical either way; for tests and benchmarks).
bool simd_available();
void set_simd_enabled(bool enabled);

// The paths by name: "avx512", "avx2", "scalar". simd_levels() lists those
// this CPU (and OS) runs, best first; simd_level() is the one in use (the
// best by default); set_simd_level forces one and throws
// std::invalid_argument for a name not in simd_levels().
std::vector<std::string> simd_levels();
std::string simd_level();
void set_simd_level(const std::string& level);

}  // namespace geocell
