// Scalar S2 cell arithmetic. Every floating-point step mirrors s2geometry's
// order of operations so that ids agree bit for bit; see s2coords.h,
// s2cell_id.cc and s2latlng.cc in s2geometry for the definitions followed.
#include "geocell/s2.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "s2_internal.h"

namespace geocell {
namespace detail {

namespace {

void init_lookup_cell(HilbertTables& t, int level, int i, int j, int orig_orientation, int pos,
                      int orientation) {
  if (level == kLookupBits) {
    const int ij = (i << kLookupBits) + j;
    t.pos[(ij << 2) + orig_orientation] = static_cast<uint16_t>((pos << 2) + orientation);
    t.ij[(pos << 2) + orig_orientation] = static_cast<uint16_t>((ij << 2) + orientation);
    return;
  }
  const int* r = kPosToIJ[orientation];
  for (int k = 0; k < 4; ++k) {
    init_lookup_cell(t, level + 1, (i << 1) + (r[k] >> 1), (j << 1) + (r[k] & 1),
                     orig_orientation, (pos << 2) + k, orientation ^ kPosToOrientation[k]);
  }
}

HilbertTables make_tables() {
  HilbertTables t{};
  for (int o = 0; o < 4; ++o) init_lookup_cell(t, 0, 0, 0, o, 0, o);
  return t;
}

}  // namespace

const HilbertTables& hilbert_tables() {
  static const HilbertTables tables = make_tables();
  return tables;
}

}  // namespace detail

using detail::face_uv_to_xyz;
using detail::ij_to_st_min;
using detail::st_to_ij;
using detail::st_to_uv;
using detail::uv_to_st;

void latlng_to_xyz(double lat_deg, double lng_deg, double xyz[3]) {
  // S1Angle::Degrees stores (pi / 180) * degrees; S2LatLng::ToPoint calls
  // sin and cos separately.
  const double phi = (M_PI / 180.0) * lat_deg;
  const double theta = (M_PI / 180.0) * lng_deg;
  const double cosphi = std::cos(phi);
  xyz[0] = std::cos(theta) * cosphi;
  xyz[1] = std::sin(theta) * cosphi;
  xyz[2] = std::sin(phi);
}

uint64_t face_ij_to_cell(int face, int i, int j) {
  const auto& lookup_pos = detail::hilbert_tables().pos;
  uint64_t n = static_cast<uint64_t>(face) << 60;
  int bits = face & 1;  // kSwapMask
  constexpr int mask = (1 << detail::kLookupBits) - 1;
  for (int k = 7; k >= 0; --k) {
    bits += ((i >> (k * detail::kLookupBits)) & mask) << (detail::kLookupBits + 2);
    bits += ((j >> (k * detail::kLookupBits)) & mask) << 2;
    bits = lookup_pos[bits];
    n |= static_cast<uint64_t>(bits >> 2) << (k * 2 * detail::kLookupBits);
    bits &= 3;
  }
  return n * 2 + 1;
}

uint64_t xyz_to_cell(const double p[3]) {
  const int face = detail::xyz_to_face(p);
  double u, v;
  detail::valid_face_xyz_to_uv(face, p, &u, &v);
  return face_ij_to_cell(face, st_to_ij(uv_to_st(u)), st_to_ij(uv_to_st(v)));
}

uint64_t latlng_to_cell(double lat_deg, double lng_deg, int level) {
  double p[3];
  latlng_to_xyz(lat_deg, lng_deg, p);
  const uint64_t leaf = xyz_to_cell(p);
  return level == kMaxLevel ? leaf : cell_to_parent(leaf, level);
}

int cell_to_face_ij(uint64_t id, int* pi, int* pj) {
  const auto& lookup_ij = detail::hilbert_tables().ij;
  int i = 0, j = 0;
  const int face = cell_face(id);
  int bits = face & 1;
  for (int k = 7; k >= 0; --k) {
    const int nbits = (k == 7) ? (kMaxLevel - 7 * detail::kLookupBits) : detail::kLookupBits;
    bits += (static_cast<int>(id >> (k * 2 * detail::kLookupBits + 1)) & ((1 << (2 * nbits)) - 1))
            << 2;
    bits = lookup_ij[bits];
    i += (bits >> (detail::kLookupBits + 2)) << (k * detail::kLookupBits);
    j += ((bits >> 2) & ((1 << detail::kLookupBits) - 1)) << (k * detail::kLookupBits);
    bits &= 3;
  }
  *pi = i;
  *pj = j;
  return face;
}

void cell_to_xyz(uint64_t id, double xyz[3]) {
  int i, j;
  const int face = cell_to_face_ij(id, &i, &j);
  // S2CellId::GetCenterSiTi: leaf centres sit at odd si; a larger cell's
  // centre is one of the corners shared by its four middle leaves.
  const bool leaf = (id & 1) != 0;
  const int delta = leaf ? 1 : (((i ^ (static_cast<int>(id) >> 2)) & 1) ? 2 : 0);
  const uint32_t si = 2u * static_cast<uint32_t>(i) + static_cast<uint32_t>(delta);
  const uint32_t ti = 2u * static_cast<uint32_t>(j) + static_cast<uint32_t>(delta);
  constexpr double kInvMaxSiTi = 1.0 / 2147483648.0;  // 1 / 2^31
  face_uv_to_xyz(face, st_to_uv(kInvMaxSiTi * si), st_to_uv(kInvMaxSiTi * ti), xyz);
}

namespace {
void xyz_to_latlng_deg(const double p[3], double* lat, double* lng) {
  // S2LatLng(const S2Point&) then S1Angle::degrees() = (180 / pi) * radians.
  // S2LatLng::Latitude/Longitude add 0.0 to map -0 to +0 (atan2(-0, -0) would
  // give -180 at the poles).
  const double lat_rad = std::atan2(p[2] + 0.0, std::sqrt(p[0] * p[0] + p[1] * p[1]));
  const double lng_rad = std::atan2(p[1] + 0.0, p[0] + 0.0);
  *lat = (180.0 / M_PI) * lat_rad;
  *lng = (180.0 / M_PI) * lng_rad;
}
}  // namespace

void cell_to_latlng(uint64_t id, double* lat_deg, double* lng_deg) {
  double p[3];
  cell_to_xyz(id, p);
  xyz_to_latlng_deg(p, lat_deg, lng_deg);
}

void cell_to_boundary(uint64_t id, double out[8]) {
  int i, j;
  const int face = cell_to_face_ij(id, &i, &j);
  const int size = 1 << (kMaxLevel - cell_level(id));  // GetSizeIJ(level)
  const int i_lo = i & -size, j_lo = j & -size;
  const double u0 = st_to_uv(ij_to_st_min(i_lo)), u1 = st_to_uv(ij_to_st_min(i_lo + size));
  const double v0 = st_to_uv(ij_to_st_min(j_lo)), v1 = st_to_uv(ij_to_st_min(j_lo + size));
  // R2Rect::GetVertex order: (lo, lo), (hi, lo), (hi, hi), (lo, hi).
  const double us[4] = {u0, u1, u1, u0};
  const double vs[4] = {v0, v0, v1, v1};
  for (int k = 0; k < 4; ++k) {
    double p[3];
    face_uv_to_xyz(face, us[k], vs[k], p);
    xyz_to_latlng_deg(p, &out[2 * k], &out[2 * k + 1]);
  }
}

int cell_to_token(uint64_t id, char out[17]) {
  if (id == 0) {
    out[0] = 'X';
    out[1] = '\0';
    return 1;
  }
  const int zero_digits = __builtin_ctzll(id) / 4;
  const int len = 16 - zero_digits;
  uint64_t v = id >> (4 * zero_digits);
  static const char kHex[] = "0123456789abcdef";
  for (int k = len - 1; k >= 0; --k) {
    out[k] = kHex[v & 15];
    v >>= 4;
  }
  out[len] = '\0';
  return len;
}

bool token_to_cell(const char* token, size_t len, uint64_t* id) {
  if (len == 0 || len > 16) return false;
  uint64_t v = 0;
  for (size_t k = 0; k < len; ++k) {
    const char c = token[k];
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return false;
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  *id = v << (4 * (16 - len));
  return true;
}

double great_circle_km(double lat1, double lng1, double lat2, double lng2) {
  constexpr double kEarthRadiusKm = 6371.0;
  constexpr double kRad = M_PI / 180.0;
  const double dlat = (lat2 - lat1) * kRad;
  const double dlng = (lng2 - lng1) * kRad;
  const double s1 = std::sin(0.5 * dlat), s2 = std::sin(0.5 * dlng);
  double a = s1 * s1 + std::cos(lat1 * kRad) * std::cos(lat2 * kRad) * s2 * s2;
  a = std::min(1.0, std::max(0.0, a));
  return 2.0 * kEarthRadiusKm * std::asin(std::sqrt(a));
}

int64_t find_invalid_latlng(const double* lat, const double* lng, size_t n) {
  // Branch-free over runs of 64 (vectorisable); the run with a bad point is
  // searched again for its first one. The comparisons also reject NaN.
  constexpr size_t kRun = 64;
  for (size_t b = 0; b < n; b += kRun) {
    const size_t e = std::min(n, b + kRun);
    bool any_bad = false;
    for (size_t k = b; k < e; ++k) {
      any_bad |= !(std::fabs(lat[k]) <= 90.0) | !(std::fabs(lng[k]) <= 1.7976931348623157e308);
    }
    if (!any_bad) continue;
    for (size_t k = b; k < e; ++k) {
      if (!(lat[k] >= -90.0 && lat[k] <= 90.0) || !std::isfinite(lng[k])) {
        return static_cast<int64_t>(k);
      }
    }
  }
  return -1;
}

int64_t find_invalid_cell(const uint64_t* cells, size_t n) {
  for (size_t k = 0; k < n; ++k) {
    if (!is_valid_cell(cells[k])) return static_cast<int64_t>(k);
  }
  return -1;
}

}  // namespace geocell
