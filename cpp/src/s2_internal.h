// Building blocks shared by the scalar and the vectorised S2 code. Private to
// the core: the public API is geocell/s2.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "geocell/s2.h"

namespace geocell::detail {

constexpr int kLookupBits = 4;
constexpr int kLimitIJ = 1 << kMaxLevel;

struct HilbertTables {
  uint16_t pos[1 << (2 * kLookupBits + 2)];  // (i, j, orientation) -> (pos, orientation)
  uint16_t ij[1 << (2 * kLookupBits + 2)];   // (pos, orientation) -> (i, j, orientation)
};
const HilbertTables& hilbert_tables();

// Hilbert curve sub-cell order for each orientation, and the orientation
// change on entering each sub-cell (s2coords.h).
constexpr int kSwapMask = 1;
constexpr int kInvertMask = 2;
constexpr int kPosToIJ[4][4] = {
    {0, 1, 3, 2},  // canonical order
    {0, 2, 3, 1},  // axes swapped
    {3, 2, 0, 1},  // bits inverted
    {3, 1, 0, 2},  // swapped and inverted
};
constexpr int kPosToOrientation[4] = {kSwapMask, 0, 0, kInvertMask | kSwapMask};

// Face = axis of the largest |component| (ties to the later axis), +3 when
// that component is negative (S2Point::LargestAbsComponent, GetFace).
inline int xyz_to_face(const double p[3]) {
  const double ax = std::fabs(p[0]), ay = std::fabs(p[1]), az = std::fabs(p[2]);
  const int axis = ax > ay ? (ax > az ? 0 : 2) : (ay > az ? 1 : 2);
  return p[axis] < 0 ? axis + 3 : axis;
}

inline void valid_face_xyz_to_uv(int face, const double p[3], double* u, double* v) {
  switch (face) {
    case 0: *u = p[1] / p[0]; *v = p[2] / p[0]; break;
    case 1: *u = -p[0] / p[1]; *v = p[2] / p[1]; break;
    case 2: *u = -p[0] / p[2]; *v = -p[1] / p[2]; break;
    case 3: *u = p[2] / p[0]; *v = p[1] / p[0]; break;
    case 4: *u = p[2] / p[1]; *v = -p[0] / p[1]; break;
    default: *u = -p[1] / p[2]; *v = -p[0] / p[2]; break;
  }
}

inline void face_uv_to_xyz(int face, double u, double v, double p[3]) {
  switch (face) {
    case 0: p[0] = 1; p[1] = u; p[2] = v; break;
    case 1: p[0] = -u; p[1] = 1; p[2] = v; break;
    case 2: p[0] = -u; p[1] = -v; p[2] = 1; break;
    case 3: p[0] = -1; p[1] = -v; p[2] = -u; break;
    case 4: p[0] = v; p[1] = -1; p[2] = -u; break;
    default: p[0] = v; p[1] = u; p[2] = -1; break;
  }
}

// Quadratic projection (S2_QUADRATIC_PROJECTION).
inline double uv_to_st(double u) {
  return u >= 0 ? 0.5 * std::sqrt(1 + 3 * u) : 1 - 0.5 * std::sqrt(1 - 3 * u);
}
inline double st_to_uv(double s) {
  return s >= 0.5 ? (1.0 / 3) * (4 * s * s - 1) : (1.0 / 3) * (1 - 4 * (1 - s) * (1 - s));
}

// floor(2^30 s) clamped to [0, 2^30 - 1]; s <= 0 and NaN give 0.
inline int st_to_ij(double s) {
  const double x = std::floor(kLimitIJ * s);
  if (!(x > 0)) return 0;
  if (x >= kLimitIJ - 1) return kLimitIJ - 1;
  return static_cast<int>(x);
}
inline double ij_to_st_min(int i) { return (1.0 / kLimitIJ) * i; }

}  // namespace geocell::detail
