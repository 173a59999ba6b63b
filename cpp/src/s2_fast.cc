// Vectorised lat/lng -> cell ids, bit-exact with the scalar path.
//
// Four points at a time (AVX2 doubles): degrees -> radians, sin/cos by our own
// polynomials, the face by blends, u and v by true IEEE divisions, the
// quadratic projection with true square roots, floor(2^30 s). Every step
// except sin/cos is the same IEEE operation in the same order as the scalar
// code, so the only difference is the sin/cos error (absolute error ~1e-16,
// libm's ~1e-16 too). That moves (i, j) only for points within ~2e-6 leaf
// widths of a leaf boundary, or the face only for near-ties of the largest
// component: such points, and anything outside the polynomials' range, are
// detected with a wide margin and recomputed by the scalar libm path.
//
// Then a scalar stage turns (face, i, j) into ids with 5-bit Hilbert tables.
// Points go through in blocks so both stages stay in L1.
#include "s2_fast.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>

#include "geocell/s2.h"
#include "s2_internal.h"

namespace geocell::detail {

namespace {

constexpr int kFastBits = 5;  // 6 table steps of 5 bits cover i, j < 2^30
constexpr int kFastSteps = kMaxLevel / kFastBits;

struct FastHilbertTable {
  // ((i5 << 7) | (j5 << 2) | orientation) -> (pos10 << 2) | orientation
  uint16_t pos[1 << (2 * kFastBits + 2)];
};

void init_fast_cell(FastHilbertTable& t, int level, int i, int j, int orig_orientation, int pos,
                    int orientation) {
  if (level == kFastBits) {
    const int ij = (i << kFastBits) + j;
    t.pos[(ij << 2) + orig_orientation] = static_cast<uint16_t>((pos << 2) + orientation);
    return;
  }
  const int* r = kPosToIJ[orientation];
  for (int k = 0; k < 4; ++k) {
    init_fast_cell(t, level + 1, (i << 1) + (r[k] >> 1), (j << 1) + (r[k] & 1), orig_orientation,
                   (pos << 2) + k, orientation ^ kPosToOrientation[k]);
  }
}

const FastHilbertTable& fast_table() {
  static const FastHilbertTable table = [] {
    FastHilbertTable t{};
    for (int o = 0; o < 4; ++o) init_fast_cell(t, 0, 0, 0, o, 0, o);
    return t;
  }();
  return table;
}

inline uint64_t encode_fast(const uint16_t* table, int face, uint32_t i, uint32_t j) {
  constexpr uint32_t mask = (1u << kFastBits) - 1;
  uint64_t n = static_cast<uint64_t>(face) << 60;
  uint32_t bits = static_cast<uint32_t>(face) & kSwapMask;
  for (int k = kFastSteps - 1; k >= 0; --k) {
    bits += ((i >> (k * kFastBits)) & mask) << (kFastBits + 2);
    bits += ((j >> (k * kFastBits)) & mask) << 2;
    bits = table[bits];
    n |= static_cast<uint64_t>(bits >> 2) << (k * 2 * kFastBits);
    bits &= 3;
  }
  return n * 2 + 1;
}

std::atomic<int> g_simd_enabled{1};
thread_local size_t t_fallbacks = 0;

}  // namespace

uint64_t face_ij_to_cell_fast(int face, uint32_t i, uint32_t j) {
  return encode_fast(fast_table().pos, face, i, j);
}

bool avx2_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

void set_simd_enabled(bool enabled) { g_simd_enabled.store(enabled ? 1 : 0); }
bool simd_enabled() { return g_simd_enabled.load() != 0 && avx2_available(); }
size_t avx2_fallback_count() { return t_fallbacks; }

void latlng_to_cell_scalar(const double* lat, const double* lng, size_t n, int level,
                           uint64_t* out) {
  for (size_t k = 0; k < n; ++k) out[k] = latlng_to_cell(lat[k], lng[k], level);
}

#define GEOCELL_AVX2 __attribute__((target("avx2,fma")))

namespace {

// sin and cos of |x| <= ~30 rad. Cody-Waite reduction by pi/2 with FMA (each
// step rounds once, so the reduced argument is within ~1e-16 of exact), then
// fdlibm's minimax kernels on [-pi/4, pi/4] (error < 2^-58 relative).
GEOCELL_AVX2 inline void sincos4(__m256d x, __m256d* sin_out, __m256d* cos_out) {
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(0.63661977236758134308)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.921fb54442d18p+0), x);
  r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.1a62633145c07p-54), r);
  const __m256d z = _mm256_mul_pd(r, r);

  __m256d ps = _mm256_set1_pd(1.58969099521155010221e-10);
  ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(-2.50507602534068634195e-08));
  ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(2.75573137070700676789e-06));
  ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(-1.98412698298579493134e-04));
  ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(8.33333333332248946124e-03));
  ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(-1.66666666666666324348e-01));
  const __m256d s = _mm256_fmadd_pd(_mm256_mul_pd(r, z), ps, r);

  __m256d pc = _mm256_set1_pd(-1.13596475577881948265e-11);
  pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(2.08757232129817482790e-09));
  pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(-2.75573143513906633035e-07));
  pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(2.48015872894767294178e-05));
  pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(-1.38888888888741095749e-03));
  pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(4.16666666666666019037e-02));
  const __m256d c = _mm256_fmadd_pd(_mm256_mul_pd(z, z), pc,
                                    _mm256_fnmadd_pd(_mm256_set1_pd(0.5), z, _mm256_set1_pd(1.0)));

  // Quadrant q = k mod 4 from the low mantissa bits of k + 1.5 * 2^52.
  const __m256i q = _mm256_castpd_si256(_mm256_add_pd(k, _mm256_set1_pd(0x1.8p52)));
  const __m256i one = _mm256_set1_epi64x(1), two = _mm256_set1_epi64x(2);
  const __m256d swap = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(q, one), one));
  const __m256d sin_sign = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_and_si256(q, two), 62));
  const __m256d cos_sign =
      _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_and_si256(_mm256_add_epi64(q, one), two), 62));
  *sin_out = _mm256_xor_pd(_mm256_blendv_pd(s, c, swap), sin_sign);
  *cos_out = _mm256_xor_pd(_mm256_blendv_pd(c, s, swap), cos_sign);
}

// Margins, far wider than the sin/cos error they cover (see the top).
constexpr double kFaceTieMargin = 0x1p-40;  // |a| - |b| between xyz components
constexpr double kLeafEdgeMargin = 0x1p-14;  // frac(2^30 s) near 0 or 1
constexpr double kMaxFastLngDeg = 1440.0;    // the reduction's range, with room

// Stage 1 for 4 points: face, i, j; returns a 4-bit mask of points that must
// be redone by the scalar path.
GEOCELL_AVX2 inline int face_ij4(const double* lat, const double* lng, int32_t* face,
                                 int32_t* i, int32_t* j) {
  const __m256d lat_deg = _mm256_loadu_pd(lat), lng_deg = _mm256_loadu_pd(lng);
  const __m256d sign_mask = _mm256_set1_pd(-0.0);
  // Out of the fast range, NaN included (ordered compares are false).
  const __m256d in_range = _mm256_and_pd(
      _mm256_cmp_pd(_mm256_andnot_pd(sign_mask, lat_deg), _mm256_set1_pd(90.0), _CMP_LE_OQ),
      _mm256_cmp_pd(_mm256_andnot_pd(sign_mask, lng_deg), _mm256_set1_pd(kMaxFastLngDeg),
                    _CMP_LE_OQ));

  // Same product as the scalar (M_PI / 180.0) * deg.
  const __m256d rad = _mm256_set1_pd(M_PI / 180.0);
  const __m256d phi = _mm256_mul_pd(rad, lat_deg), theta = _mm256_mul_pd(rad, lng_deg);
  __m256d sin_phi, cos_phi, sin_theta, cos_theta;
  sincos4(phi, &sin_phi, &cos_phi);
  sincos4(theta, &sin_theta, &cos_theta);
  const __m256d x = _mm256_mul_pd(cos_theta, cos_phi);
  const __m256d y = _mm256_mul_pd(sin_theta, cos_phi);
  const __m256d z = sin_phi;

  const __m256d ax = _mm256_andnot_pd(sign_mask, x), ay = _mm256_andnot_pd(sign_mask, y),
                az = _mm256_andnot_pd(sign_mask, z);
  const __m256d margin = _mm256_set1_pd(kFaceTieMargin);
  auto near = [&](__m256d a, __m256d b) GEOCELL_AVX2 {
    return _mm256_cmp_pd(_mm256_andnot_pd(sign_mask, _mm256_sub_pd(a, b)), margin, _CMP_LT_OQ);
  };
  __m256d redo = _mm256_or_pd(_mm256_or_pd(near(ax, ay), near(ax, az)), near(ay, az));

  // Largest component, ties to the later axis (xyz_to_face).
  const __m256d gt_xy = _mm256_cmp_pd(ax, ay, _CMP_GT_OQ);
  const __m256d is_x = _mm256_and_pd(gt_xy, _mm256_cmp_pd(ax, az, _CMP_GT_OQ));
  const __m256d is_y = _mm256_andnot_pd(gt_xy, _mm256_cmp_pd(ay, az, _CMP_GT_OQ));
  const __m256d denom = _mm256_blendv_pd(_mm256_blendv_pd(z, y, is_y), x, is_x);
  const __m256d neg = _mm256_cmp_pd(denom, _mm256_setzero_pd(), _CMP_LT_OQ);
  const __m256d nx = _mm256_xor_pd(x, sign_mask), ny = _mm256_xor_pd(y, sign_mask);
  // Numerators of u and v per face (valid_face_xyz_to_uv); -a / b == -(a / b).
  const __m256d u_x = _mm256_blendv_pd(y, z, neg), v_x = _mm256_blendv_pd(z, y, neg);
  const __m256d u_y = _mm256_blendv_pd(nx, z, neg), v_y = _mm256_blendv_pd(z, nx, neg);
  const __m256d u_z = _mm256_blendv_pd(nx, ny, neg), v_z = _mm256_blendv_pd(ny, nx, neg);
  const __m256d u_num = _mm256_blendv_pd(_mm256_blendv_pd(u_z, u_y, is_y), u_x, is_x);
  const __m256d v_num = _mm256_blendv_pd(_mm256_blendv_pd(v_z, v_y, is_y), v_x, is_x);
  const __m256d u = _mm256_div_pd(u_num, denom), v = _mm256_div_pd(v_num, denom);

  const __m256d axis = _mm256_blendv_pd(
      _mm256_blendv_pd(_mm256_set1_pd(2.0), _mm256_set1_pd(1.0), is_y), _mm256_setzero_pd(), is_x);
  const __m256d face_d = _mm256_add_pd(axis, _mm256_and_pd(neg, _mm256_set1_pd(3.0)));

  // uv_to_st, then floor(2^30 s) clamped as st_to_ij; 1 - 3u == 1 + 3|u| for u < 0.
  const __m256d one = _mm256_set1_pd(1.0), half = _mm256_set1_pd(0.5),
                three = _mm256_set1_pd(3.0), limit = _mm256_set1_pd(kLimitIJ),
                edge = _mm256_set1_pd(kLeafEdgeMargin);
  auto to_ij = [&](__m256d w, __m256d* redo_mask) GEOCELL_AVX2 {
    const __m256d h =
        _mm256_mul_pd(half, _mm256_sqrt_pd(_mm256_add_pd(
                                one, _mm256_mul_pd(three, _mm256_andnot_pd(sign_mask, w)))));
    const __m256d nonneg = _mm256_cmp_pd(w, _mm256_setzero_pd(), _CMP_GE_OQ);
    const __m256d s = _mm256_blendv_pd(_mm256_sub_pd(one, h), h, nonneg);
    const __m256d t = _mm256_mul_pd(limit, s);
    const __m256d fl = _mm256_floor_pd(t);
    const __m256d frac = _mm256_sub_pd(t, fl);
    *redo_mask = _mm256_or_pd(
        *redo_mask, _mm256_or_pd(_mm256_cmp_pd(frac, edge, _CMP_LT_OQ),
                                 _mm256_cmp_pd(frac, _mm256_sub_pd(one, edge), _CMP_GT_OQ)));
    const __m256d clamped =
        _mm256_min_pd(_mm256_max_pd(fl, _mm256_setzero_pd()), _mm256_set1_pd(kLimitIJ - 1));
    return _mm256_cvttpd_epi32(clamped);
  };
  const __m128i iv = to_ij(u, &redo);
  const __m128i jv = to_ij(v, &redo);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(i), iv);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(j), jv);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(face), _mm256_cvttpd_epi32(face_d));
  redo = _mm256_or_pd(redo, _mm256_xor_pd(in_range, _mm256_castsi256_pd(_mm256_set1_epi64x(-1))));
  return _mm256_movemask_pd(redo);
}

}  // namespace

GEOCELL_AVX2 void latlng_to_cell_avx2(const double* lat, const double* lng, size_t n, int level,
                                      uint64_t* out) {
  constexpr size_t kBlock = 256;
  alignas(32) int32_t face[kBlock], ii[kBlock], jj[kBlock];
  uint32_t redo[kBlock];
  const uint16_t* table = fast_table().pos;
  const uint64_t lsb = lowest_bit_at_level(level);
  const uint64_t keep = ~lsb + 1;
  size_t fallbacks = 0;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = std::min(kBlock, n - b);
    const size_t m4 = m & ~size_t{3};
    size_t nredo = 0;
    for (size_t k = 0; k < m4; k += 4) {
      int mask = face_ij4(lat + b + k, lng + b + k, face + k, ii + k, jj + k);
      while (mask) {
        redo[nredo++] = static_cast<uint32_t>(k + __builtin_ctz(mask));
        mask &= mask - 1;
      }
    }
    for (size_t k = 0; k < m4; ++k) {
      const uint64_t leaf = encode_fast(table, face[k], static_cast<uint32_t>(ii[k]),
                                        static_cast<uint32_t>(jj[k]));
      out[b + k] = (leaf & keep) | lsb;
    }
    for (size_t k = m4; k < m; ++k) out[b + k] = latlng_to_cell(lat[b + k], lng[b + k], level);
    for (size_t r = 0; r < nredo; ++r) {
      const size_t k = b + redo[r];
      out[k] = latlng_to_cell(lat[k], lng[k], level);
    }
    fallbacks += nredo;
  }
  t_fallbacks = fallbacks;
}

}  // namespace geocell::detail
