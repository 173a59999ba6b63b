// Vectorised lat/lng -> cell ids, bit-exact with the scalar path.
//
// Four points at a time (AVX2 doubles), or eight (AVX-512, the same operations
// lane for lane, with mask registers for the blends and compares): degrees -> radians (the same product
// as the scalar code), sin/cos by our own polynomials, the face by blends,
// u and v through one reciprocal of the face's component, the quadratic
// projection with true square roots, floor(2^30 s). The values differ from
// the scalar path's only by the sin/cos and reciprocal errors: a few ulps,
// under ~1e-15 in s, i.e. ~1e-6 of a leaf width. That can change the face
// only at near-ties of the largest |component|, and (i, j) only within that
// distance of a leaf edge (u = 0 included: s = 1/2 is one). Points within
// a wide margin of either (2^-40 between components; 2^-14 of a leaf width,
// ~60x the error) and anything outside the polynomials' range are recomputed
// by the scalar libm path; the rest agree exactly. About 2.4e-4 of random points are redone.
//
// Then (face, i, j) become ids by a bit-parallel Hilbert index, 8 points at a
// time, without tables. Points go through in blocks of 256, stage by stage:
// short stages keep dependency chains short, so the out-of-order core
// overlaps many iterations, and the block's buffers stay in L1. One driver,
// templated on the stage set (Avx2, Avx512), is inlined into each ISA's entry
// point; the Hilbert stage is the AVX2 one for both.
#include "s2_fast.h"

#if defined(__x86_64__) || defined(__i386__)
#define GEOCELL_X86 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>

#include "geocell/s2.h"
#include "s2_internal.h"

namespace geocell::detail {

namespace {

// The path latlng_to_cell_batch takes (a SimdLevel); -1 until first asked:
// the best this CPU runs.
std::atomic<int> g_simd_level{-1};

// As find_invalid_latlng.
inline bool point_is_valid(double lat, double lng) {
  return lat >= -90.0 && lat <= 90.0 && std::isfinite(lng);
}
thread_local size_t t_fallbacks = 0;

}  // namespace

bool avx2_available() {
#ifdef GEOCELL_X86
  // libgcc's checks include the OS's support for the AVX register state.
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

bool avx512_available() {
#ifdef GEOCELL_X86
  // As above, the checks include the OS's support for the ZMM state.
  static const bool ok = [] {
    __builtin_cpu_init();
    return avx2_available() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
  }();
  return ok;
#else
  return false;
#endif
}

SimdLevel best_simd_level() {
  return avx512_available() ? SimdLevel::kAvx512 : avx2_available() ? SimdLevel::kAvx2 : SimdLevel::kScalar;
}

bool set_simd_level(SimdLevel level) {
  if (static_cast<int>(level) < 0 || level > best_simd_level()) return false;
  g_simd_level.store(static_cast<int>(level));
  return true;
}

SimdLevel simd_level() {
  const int l = g_simd_level.load();
  return l < 0 ? best_simd_level() : static_cast<SimdLevel>(l);
}

void set_simd_enabled(bool enabled) { set_simd_level(enabled ? best_simd_level() : SimdLevel::kScalar); }
bool simd_enabled() { return simd_level() != SimdLevel::kScalar; }
size_t avx2_fallback_count() { return t_fallbacks; }

void latlng_to_cell_scalar(const double* lat, const double* lng, size_t n, int level,
                           uint64_t* out) {
  for (size_t k = 0; k < n; ++k) out[k] = latlng_to_cell(lat[k], lng[k], level);
}

#ifdef GEOCELL_X86

#define GEOCELL_AVX2 __attribute__((target("avx2,fma")))

namespace {

// fdlibm's __kernel_sin / __kernel_cos minimax coefficients (highest power first),
// shared by the AVX2 and AVX-512 kernels.
constexpr double kSinPoly[6] = {1.58969099521155010221e-10, -2.50507602534068634195e-08,
                                2.75573137070700676789e-06, -1.98412698298579493134e-04,
                                8.33333333332248946124e-03, -1.66666666666666324348e-01};
constexpr double kCosPoly[6] = {-1.13596475577881948265e-11, 2.08757232129817482790e-09,
                                -2.75573143513906633035e-07, 2.48015872894767294178e-05,
                                -1.38888888888741095749e-03, 4.16666666666666019037e-02};

// sin and cos of |x| <= ~30 rad. Cody-Waite reduction by pi/2 with FMA (each
// step rounds once, so the reduced argument is within ~1e-16 of exact), then
// fdlibm's minimax kernels on [-pi/4, pi/4] (error < 2^-58 relative).
GEOCELL_AVX2 inline void sincos4(__m256d x, __m256d* sin_out, __m256d* cos_out) {
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(0.63661977236758134308)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.921fb54442d18p+0), x);
  r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0x1.1a62633145c07p-54), r);
  const __m256d z = _mm256_mul_pd(r, r);

  __m256d ps = _mm256_set1_pd(kSinPoly[0]);
  for (int n = 1; n < 6; ++n) ps = _mm256_fmadd_pd(ps, z, _mm256_set1_pd(kSinPoly[n]));
  const __m256d s = _mm256_fmadd_pd(_mm256_mul_pd(r, z), ps, r);

  __m256d pc = _mm256_set1_pd(kCosPoly[0]);
  for (int n = 1; n < 6; ++n) pc = _mm256_fmadd_pd(pc, z, _mm256_set1_pd(kCosPoly[n]));
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
// GEOCELL_TEST_ZERO_MARGINS (never in a real build) sets both to 0, to check
// that the tests notice mismatches without them.
#ifdef GEOCELL_TEST_ZERO_MARGINS
constexpr double kFaceTieMargin = 0.0;
constexpr double kLeafEdgeMargin = 0.0;
#else
constexpr double kFaceTieMargin = 0x1p-40;  // |a| - |b| between xyz components
constexpr double kLeafEdgeMargin = 0x1p-14;  // frac(2^30 s) near 0 or 1
#endif
constexpr double kMaxFastLngDeg = 1440.0;  // the reduction's range, with room

// The low 32 bits of four 64-bit lanes, stored as four uint32.
GEOCELL_AVX2 inline void store_low32(uint32_t* out, __m256i v) {
  const __m256i packed = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  _mm_store_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}

GEOCELL_AVX2 inline __m256i shr(__m256i v, int n) { return _mm256_srli_epi32(v, n); }
GEOCELL_AVX2 inline __m256i xor_(__m256i p, __m256i q) { return _mm256_xor_si256(p, q); }
GEOCELL_AVX2 inline __m256i and_(__m256i p, __m256i q) { return _mm256_and_si256(p, q); }

// Stage 4 for 8 points: leaf ids from face, i, j without tables, by the
// bit-parallel Hilbert index of "2D Hilbert curves in O(1)" (rawrunprotected,
// public domain): prefix scans over the bits of the 32-bit lanes compute every
// level's orientation at once. S2's curve is that curve with (x, y) = (i, j)
// on even faces and (j, i) on odd faces (which start with axes swapped).
template <bool kStream>
GEOCELL_AVX2 inline void hilbert8(const uint32_t* face, const uint32_t* is, const uint32_t* js,
                                  uint64_t keep, uint64_t lsb, uint64_t* out) {
  const __m256i f = _mm256_load_si256(reinterpret_cast<const __m256i*>(face));
  const __m256i i = _mm256_load_si256(reinterpret_cast<const __m256i*>(is));
  const __m256i j = _mm256_load_si256(reinterpret_cast<const __m256i*>(js));
  const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(f, 31));
  // 30-bit coordinates moved to the top of the 32-bit lanes.
  const __m256i x = _mm256_slli_epi32(
      _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i), _mm256_castsi256_ps(j), odd)), 2);
  const __m256i y = _mm256_slli_epi32(
      _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(j), _mm256_castsi256_ps(i), odd)), 2);
  const __m256i ones = _mm256_set1_epi32(-1);
  __m256i A, B, C, D;
  {
    const __m256i a = xor_(x, y);
    const __m256i b = xor_(ones, a);
    const __m256i c = xor_(ones, _mm256_or_si256(x, y));
    const __m256i d = _mm256_andnot_si256(y, x);
    A = _mm256_or_si256(a, shr(b, 1));
    B = xor_(shr(a, 1), a);
    C = xor_(xor_(shr(c, 1), and_(b, shr(d, 1))), c);
    D = xor_(xor_(and_(a, shr(c, 1)), shr(d, 1)), d);
  }
  // Each round combines the scans over runs of n levels into runs of 2n.
  auto round = [&](int n, bool last) GEOCELL_AVX2 {
    const __m256i a = A, b = B, c = C, d = D, ab = xor_(a, b);
    const __m256i cn = shr(c, n), dn = shr(d, n);
    if (!last) {
      A = xor_(and_(a, shr(a, n)), and_(b, shr(b, n)));
      B = xor_(and_(a, shr(b, n)), and_(b, shr(ab, n)));
    }
    C = xor_(C, xor_(and_(a, cn), and_(b, dn)));
    D = xor_(D, xor_(and_(b, cn), and_(ab, dn)));
  };
  round(2, false);
  round(4, false);
  round(8, false);
  round(16, true);
  const __m256i a = xor_(C, shr(C, 1));
  const __m256i b = xor_(D, shr(D, 1));
  const __m256i i0 = xor_(x, y);
  const __m256i i1 = _mm256_or_si256(b, _mm256_andnot_si256(_mm256_or_si256(i0, a), ones));
  // Interleave i1 (odd bits) and i0 (even bits) a nibble at a time through
  // byte shuffles: each byte then holds 4 bits of each, and unpacking the
  // low and high nibbles' bytes gives the 64-bit index of each point.
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i spread_even = _mm256_setr_epi8(
      0x00, 0x01, 0x04, 0x05, 0x10, 0x11, 0x14, 0x15, 0x40, 0x41, 0x44, 0x45, 0x50, 0x51, 0x54, 0x55,
      0x00, 0x01, 0x04, 0x05, 0x10, 0x11, 0x14, 0x15, 0x40, 0x41, 0x44, 0x45, 0x50, 0x51, 0x54, 0x55);
  const __m256i spread_odd = _mm256_slli_epi16(spread_even, 1);
  const __m256i lo = _mm256_or_si256(_mm256_shuffle_epi8(spread_odd, and_(i1, nibble)),
                                     _mm256_shuffle_epi8(spread_even, and_(i0, nibble)));
  const __m256i hi = _mm256_or_si256(
      _mm256_shuffle_epi8(spread_odd, and_(_mm256_srli_epi16(i1, 4), nibble)),
      _mm256_shuffle_epi8(spread_even, and_(_mm256_srli_epi16(i0, 4), nibble)));
  // Points 0, 1 | 4, 5 and 2, 3 | 6, 7 (unpacking works within 128-bit lanes).
  const __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi);
  const __m256i keep_v = _mm256_set1_epi64x(static_cast<long long>(keep));
  const __m256i lsb_v = _mm256_set1_epi64x(static_cast<long long>(lsb));
  for (int half = 0; half < 2; ++half) {
    const __m256i index = _mm256_permute2x128_si256(u0, u1, half ? 0x31 : 0x20);
    const __m256i f64 = _mm256_cvtepu32_epi64(half ? _mm256_extracti128_si256(f, 1) : _mm256_castsi256_si128(f));
    // The index's top 60 bits are the position; face above it, marker bit below.
    __m256i id = _mm256_or_si256(_mm256_or_si256(_mm256_slli_epi64(f64, 61), _mm256_srli_epi64(index, 3)),
                                 _mm256_set1_epi64x(1));
    id = _mm256_or_si256(_mm256_and_si256(id, keep_v), lsb_v);
    if (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out + 4 * half), id);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * half), id);
    }
  }
}

// Stage 1 for 4 points: the direction (x, y, z) as latlng_to_xyz computes
// it, to within sin/cos error; returns a 4-bit mask of points outside the
// polynomials' range (NaN included), which the scalar path redoes.
GEOCELL_AVX2 inline int xyz4(const double* lat, const double* lng, double* xs, double* ys,
                             double* zs) {
  const __m256d lat_deg = _mm256_loadu_pd(lat), lng_deg = _mm256_loadu_pd(lng);
  const __m256d sign_mask = _mm256_set1_pd(-0.0);
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
  _mm256_store_pd(xs, _mm256_mul_pd(cos_theta, cos_phi));
  _mm256_store_pd(ys, _mm256_mul_pd(sin_theta, cos_phi));
  _mm256_store_pd(zs, sin_phi);
  return _mm256_movemask_pd(in_range) ^ 0xF;
}

// Stage 2 for 4 points: face, u and v from (x, y, z); returns a 4-bit mask
// of near-ties between the largest components, which the scalar path redoes.
// (Short stages keep the dependency chains short enough for the out-of-order
// core to overlap many iterations.)
GEOCELL_AVX2 inline int face_uv4(const double* xs, const double* ys, const double* zs,
                                 uint32_t* face, double* us, double* vs) {
  const __m256d sign_mask = _mm256_set1_pd(-0.0);
  const __m256d x = _mm256_load_pd(xs), y = _mm256_load_pd(ys), z = _mm256_load_pd(zs);
  const __m256d ax = _mm256_andnot_pd(sign_mask, x), ay = _mm256_andnot_pd(sign_mask, y),
                az = _mm256_andnot_pd(sign_mask, z);
  const __m256d margin = _mm256_set1_pd(kFaceTieMargin);
  auto near = [&](__m256d a, __m256d b) GEOCELL_AVX2 {
    return _mm256_cmp_pd(_mm256_andnot_pd(sign_mask, _mm256_sub_pd(a, b)), margin, _CMP_LT_OQ);
  };
  const __m256d ties = _mm256_or_pd(_mm256_or_pd(near(ax, ay), near(ax, az)), near(ay, az));

  // Largest component, ties to the later axis (xyz_to_face).
  const __m256d gt_xy = _mm256_cmp_pd(ax, ay, _CMP_GT_OQ);
  const __m256d is_x = _mm256_and_pd(gt_xy, _mm256_cmp_pd(ax, az, _CMP_GT_OQ));
  const __m256d is_y = _mm256_andnot_pd(gt_xy, _mm256_cmp_pd(ay, az, _CMP_GT_OQ));
  const __m256d is_z = _mm256_xor_pd(_mm256_or_pd(is_x, is_y),
                                     _mm256_castsi256_pd(_mm256_set1_epi64x(-1)));
  const __m256d denom = _mm256_blendv_pd(_mm256_blendv_pd(z, y, is_y), x, is_x);
  const __m256d neg = _mm256_cmp_pd(denom, _mm256_setzero_pd(), _CMP_LT_OQ);
  // valid_face_xyz_to_uv: (u, v) = (a, b) / denom on faces 0-2 and (b, a) /
  // denom on faces 3-5, with a = y on the x faces and -x otherwise, b = -y on
  // the z faces and z otherwise (-p / q == -(p / q) exactly).
  const __m256d a = _mm256_blendv_pd(_mm256_xor_pd(x, sign_mask), y, is_x);
  const __m256d b = _mm256_blendv_pd(z, _mm256_xor_pd(y, sign_mask), is_z);
  // One division for both: u and v may be an ulp or two further from the
  // scalar quotients, which the leaf-edge margin absorbs as well.
  const __m256d inv = _mm256_div_pd(_mm256_set1_pd(1.0), denom);
  _mm256_store_pd(us, _mm256_mul_pd(_mm256_blendv_pd(a, b, neg), inv));
  _mm256_store_pd(vs, _mm256_mul_pd(_mm256_blendv_pd(b, a, neg), inv));

  const __m256d axis = _mm256_blendv_pd(
      _mm256_blendv_pd(_mm256_set1_pd(2.0), _mm256_set1_pd(1.0), is_y), _mm256_setzero_pd(), is_x);
  const __m256d face_d = _mm256_add_pd(axis, _mm256_and_pd(neg, _mm256_set1_pd(3.0)));
  // Small integers sit in the low mantissa bits of x + 2^52.
  store_low32(face, _mm256_and_si256(_mm256_castpd_si256(_mm256_add_pd(face_d, _mm256_set1_pd(0x1p52))),
                                     _mm256_set1_epi64x(7)));
  return _mm256_movemask_pd(ties);
}

// Stage 3 for 4 coordinates (u or v): uv_to_st, then floor(2^30 s) clamped
// as st_to_ij; returns a 4-bit mask of values within the margin of a leaf
// edge.
GEOCELL_AVX2 inline int st_ij4(const double* ws, uint32_t* ij_out) {
  const __m256d sign_mask = _mm256_set1_pd(-0.0), one = _mm256_set1_pd(1.0),
                half = _mm256_set1_pd(0.5), edge = _mm256_set1_pd(kLeafEdgeMargin);
  const __m256d w = _mm256_load_pd(ws);
  // 1 - 3w == 1 + 3|w| for w < 0.
  const __m256d h = _mm256_mul_pd(
      half, _mm256_sqrt_pd(_mm256_add_pd(
                one, _mm256_mul_pd(_mm256_set1_pd(3.0), _mm256_andnot_pd(sign_mask, w)))));
  // s = h for w >= 0 and 1 - h for w < 0, as 1/2 +- (h - 1/2): every step
  // exact for h in [1/2, 1], so the same doubles as the scalar branches.
  const __m256d s = _mm256_add_pd(half, _mm256_xor_pd(_mm256_sub_pd(h, half), _mm256_and_pd(w, sign_mask)));
  const __m256d t = _mm256_mul_pd(_mm256_set1_pd(kLimitIJ), s);
  const __m256d frac = _mm256_sub_pd(t, _mm256_floor_pd(t));
  const __m256d near_edge = _mm256_or_pd(_mm256_cmp_pd(frac, edge, _CMP_LT_OQ),
                                         _mm256_cmp_pd(frac, _mm256_sub_pd(one, edge), _CMP_GT_OQ));
  // Truncation is floor, and no clamping is needed: t < 0 or t >= 2^30 takes
  // |u| > 1, i.e. a near-tie of the largest components, redone anyway.
  _mm_store_si128(reinterpret_cast<__m128i*>(ij_out), _mm256_cvttpd_epi32(t));
  return _mm256_movemask_pd(near_edge);
}

// The AVX2 stages, 4 points per call (one 4-point step of each stage).
struct Avx2 {
  static constexpr size_t kWidth = 4;
  GEOCELL_AVX2 static int xyz(const double* lat, const double* lng, double* xs, double* ys, double* zs) {
    return xyz4(lat, lng, xs, ys, zs);
  }
  GEOCELL_AVX2 static int face_uv(const double* xs, const double* ys, const double* zs, uint32_t* face,
                                  double* us, double* vs) {
    return face_uv4(xs, ys, zs, face, us, vs);
  }
  GEOCELL_AVX2 static int st_ij(const double* ws, uint32_t* ij) { return st_ij4(ws, ij); }
  // Leaves no dirty upper register state for the scalar code that follows.
  GEOCELL_AVX2 static void zeroupper() { _mm256_zeroupper(); }
};

// ---- AVX-512: the same stages, 8 points per step, masks instead of blends.
// (The maskz_ forms with all lanes set avoid GCC 12's false "may be used
// uninitialized" warnings about the plain forms' undefined source.)
// Every operation is the AVX2 stage's, lane for lane (the same roundings in
// the same order), so the values, and hence the margins' validity, are the same.

#define GEOCELL_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))

GEOCELL_AVX512 inline __m512d abs8(__m512d v) {
  return _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(v), _mm512_set1_epi64(0x7FFFFFFFFFFFFFFF)));
}

// As sincos4.
GEOCELL_AVX512 inline void sincos8(__m512d x, __m512d* sin_out, __m512d* cos_out) {
  const __m512d k = _mm512_maskz_roundscale_pd(0xFF, _mm512_mul_pd(x, _mm512_set1_pd(0.63661977236758134308)),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.921fb54442d18p+0), x);
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(0x1.1a62633145c07p-54), r);
  const __m512d z = _mm512_mul_pd(r, r);

  __m512d ps = _mm512_set1_pd(kSinPoly[0]);
  for (int n = 1; n < 6; ++n) ps = _mm512_fmadd_pd(ps, z, _mm512_set1_pd(kSinPoly[n]));
  const __m512d s = _mm512_fmadd_pd(_mm512_mul_pd(r, z), ps, r);

  __m512d pc = _mm512_set1_pd(kCosPoly[0]);
  for (int n = 1; n < 6; ++n) pc = _mm512_fmadd_pd(pc, z, _mm512_set1_pd(kCosPoly[n]));
  const __m512d c = _mm512_fmadd_pd(_mm512_mul_pd(z, z), pc,
                                    _mm512_fnmadd_pd(_mm512_set1_pd(0.5), z, _mm512_set1_pd(1.0)));

  const __m512i q = _mm512_castpd_si512(_mm512_add_pd(k, _mm512_set1_pd(0x1.8p52)));
  const __m512i one = _mm512_set1_epi64(1), two = _mm512_set1_epi64(2);
  const __mmask8 swap = _mm512_test_epi64_mask(q, one);
  const __m512i sin_sign = _mm512_maskz_slli_epi64(0xFF, _mm512_and_si512(q, two), 62);
  const __m512i cos_sign = _mm512_maskz_slli_epi64(0xFF, _mm512_and_si512(_mm512_add_epi64(q, one), two), 62);
  *sin_out = _mm512_xor_pd(_mm512_mask_blend_pd(swap, s, c), _mm512_castsi512_pd(sin_sign));
  *cos_out = _mm512_xor_pd(_mm512_mask_blend_pd(swap, c, s), _mm512_castsi512_pd(cos_sign));
}

struct Avx512 {
  static constexpr size_t kWidth = 8;

  // As xyz4.
  GEOCELL_AVX512 static int xyz(const double* lat, const double* lng, double* xs, double* ys, double* zs) {
    const __m512d lat_deg = _mm512_loadu_pd(lat), lng_deg = _mm512_loadu_pd(lng);
    const __mmask8 in_range =
        _mm512_cmp_pd_mask(abs8(lat_deg), _mm512_set1_pd(90.0), _CMP_LE_OQ) &
        _mm512_cmp_pd_mask(abs8(lng_deg), _mm512_set1_pd(kMaxFastLngDeg), _CMP_LE_OQ);
    const __m512d rad = _mm512_set1_pd(M_PI / 180.0);
    const __m512d phi = _mm512_mul_pd(rad, lat_deg), theta = _mm512_mul_pd(rad, lng_deg);
    __m512d sin_phi, cos_phi, sin_theta, cos_theta;
    sincos8(phi, &sin_phi, &cos_phi);
    sincos8(theta, &sin_theta, &cos_theta);
    _mm512_store_pd(xs, _mm512_mul_pd(cos_theta, cos_phi));
    _mm512_store_pd(ys, _mm512_mul_pd(sin_theta, cos_phi));
    _mm512_store_pd(zs, sin_phi);
    return static_cast<uint8_t>(~in_range);
  }

  // As face_uv4.
  GEOCELL_AVX512 static int face_uv(const double* xs, const double* ys, const double* zs, uint32_t* face,
                                    double* us, double* vs) {
    const __m512d x = _mm512_load_pd(xs), y = _mm512_load_pd(ys), z = _mm512_load_pd(zs);
    const __m512d ax = abs8(x), ay = abs8(y), az = abs8(z);
    const __m512d margin = _mm512_set1_pd(kFaceTieMargin);
    auto near = [&](__m512d a, __m512d b) GEOCELL_AVX512 {
      return _mm512_cmp_pd_mask(abs8(_mm512_sub_pd(a, b)), margin, _CMP_LT_OQ);
    };
    const __mmask8 ties = near(ax, ay) | near(ax, az) | near(ay, az);
    const __mmask8 gt_xy = _mm512_cmp_pd_mask(ax, ay, _CMP_GT_OQ);
    const __mmask8 is_x = gt_xy & _mm512_cmp_pd_mask(ax, az, _CMP_GT_OQ);
    const __mmask8 is_y = static_cast<__mmask8>(~gt_xy) & _mm512_cmp_pd_mask(ay, az, _CMP_GT_OQ);
    const __mmask8 is_z = static_cast<__mmask8>(~(is_x | is_y));
    const __m512d denom = _mm512_mask_blend_pd(is_x, _mm512_mask_blend_pd(is_y, z, y), x);
    const __mmask8 neg = _mm512_cmp_pd_mask(denom, _mm512_setzero_pd(), _CMP_LT_OQ);
    const __m512d sign_mask = _mm512_set1_pd(-0.0);
    const __m512d a = _mm512_mask_blend_pd(is_x, _mm512_xor_pd(x, sign_mask), y);
    const __m512d b = _mm512_mask_blend_pd(is_z, z, _mm512_xor_pd(y, sign_mask));
    const __m512d inv = _mm512_div_pd(_mm512_set1_pd(1.0), denom);
    _mm512_store_pd(us, _mm512_mul_pd(_mm512_mask_blend_pd(neg, a, b), inv));
    _mm512_store_pd(vs, _mm512_mul_pd(_mm512_mask_blend_pd(neg, b, a), inv));
    __m256i f = _mm256_set1_epi32(2);
    f = _mm256_mask_mov_epi32(f, is_y, _mm256_set1_epi32(1));
    f = _mm256_mask_mov_epi32(f, is_x, _mm256_setzero_si256());
    f = _mm256_mask_add_epi32(f, neg, f, _mm256_set1_epi32(3));
    _mm256_store_si256(reinterpret_cast<__m256i*>(face), f);
    return ties;
  }

  // As st_ij4.
  GEOCELL_AVX512 static int st_ij(const double* ws, uint32_t* ij_out) {
    const __m512d sign_mask = _mm512_set1_pd(-0.0), one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5),
                  edge = _mm512_set1_pd(kLeafEdgeMargin);
    const __m512d w = _mm512_load_pd(ws);
    const __m512d h = _mm512_mul_pd(
        half, _mm512_maskz_sqrt_pd(0xFF, _mm512_add_pd(one, _mm512_mul_pd(_mm512_set1_pd(3.0), abs8(w)))));
    const __m512d s = _mm512_add_pd(half, _mm512_xor_pd(_mm512_sub_pd(h, half), _mm512_and_pd(w, sign_mask)));
    const __m512d t = _mm512_mul_pd(_mm512_set1_pd(kLimitIJ), s);
    const __m512d frac = _mm512_sub_pd(t, _mm512_maskz_roundscale_pd(0xFF, t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    const __mmask8 near_edge = _mm512_cmp_pd_mask(frac, edge, _CMP_LT_OQ) |
                               _mm512_cmp_pd_mask(frac, _mm512_sub_pd(one, edge), _CMP_GT_OQ);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ij_out), _mm512_maskz_cvttpd_epi32(0xFF, t));
    return near_edge;
  }

  GEOCELL_AVX512 static void zeroupper() { _mm256_zeroupper(); }
};

// The fast path over stages K (Avx2 or Avx512). Not compiled by itself:
// inlined, with everything it calls, into the entry points below, which
// carry the target ISA (flatten).
template <class K>
inline int64_t latlng_to_cell_fast(const double* lat, const double* lng, size_t n, int level,
                                   uint64_t* out, bool stream_out, bool check) {
  constexpr size_t kBlock = 256, W = K::kWidth;
  // Stage buffers; u and v (and i and j) share one array each so stage 3
  // runs over both in one loop.
  alignas(64) double xs[kBlock], ys[kBlock], zs[kBlock], uv[2 * kBlock];
  alignas(64) uint32_t face[kBlock], ij[2 * kBlock];
  uint32_t redo[kBlock];
  const uint64_t lsb = lowest_bit_at_level(level);
  const uint64_t keep = ~lsb + 1;
  size_t fallbacks = 0;
  // Invalid points (NaN, inf, |lat| > 90) always fail the fast path's range
  // test, so checking only the points redone by the scalar path finds them.
  auto invalid = [&](size_t k) { return check && !point_is_valid(lat[k], lng[k]); };
  // Streamed output bypasses the caches (no read for ownership, no eviction
  // of the input); blocks are multiples of 8 ids, so an aligned start suffices.
  size_t head = 0;
  if (stream_out && (reinterpret_cast<uintptr_t>(out) & 31) != 0) {
    // Large numpy arrays start 16 bytes into a page: the first few ids by the
    // scalar path, then everything aligned.
    head = std::min(n, ((32 - (reinterpret_cast<uintptr_t>(out) & 31)) & 31) / 8);
    for (size_t k = 0; k < head; ++k) {
      if (invalid(k)) return static_cast<int64_t>(k);
      out[k] = latlng_to_cell(lat[k], lng[k], level);
    }
    if ((reinterpret_cast<uintptr_t>(out + head) & 31) != 0) stream_out = false;  // not 8-aligned
    lat += head;
    lng += head;
    out += head;
    n -= head;
  }
  const bool stream = stream_out;
  auto finish = [&](int64_t first_invalid) {
    if (stream) _mm_sfence();
    t_fallbacks = fallbacks;
    return first_invalid < 0 ? first_invalid : first_invalid + static_cast<int64_t>(head);
  };
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = std::min(kBlock, n - b);
    const size_t m8 = m & ~size_t{7};
    uint64_t redo_bits[kBlock / 64] = {};
    auto flag = [&](size_t k, int mask) { redo_bits[k / 64] |= static_cast<uint64_t>(mask) << (k % 64); };
    for (size_t k = 0; k < m8; k += W) flag(k, K::xyz(lat + b + k, lng + b + k, xs + k, ys + k, zs + k));
    for (size_t k = 0; k < m8; k += W) flag(k, K::face_uv(xs + k, ys + k, zs + k, face + k, uv + k, uv + kBlock + k));
    for (size_t k = 0; k < m8; k += W) flag(k, K::st_ij(uv + k, ij + k));
    for (size_t k = 0; k < m8; k += W) flag(k, K::st_ij(uv + kBlock + k, ij + kBlock + k));
    if (stream) {
      for (size_t k = 0; k < m8; k += 8) hilbert8<true>(face + k, ij + k, ij + kBlock + k, keep, lsb, out + b + k);
    } else {
      for (size_t k = 0; k < m8; k += 8) hilbert8<false>(face + k, ij + k, ij + kBlock + k, keep, lsb, out + b + k);
    }
    // The rest is scalar (SSE) code: leave no dirty upper register state.
    K::zeroupper();
    size_t nredo = 0;
    for (size_t w = 0; w < kBlock / 64; ++w) {
      for (uint64_t mask = redo_bits[w]; mask; mask &= mask - 1) {
        redo[nredo++] = static_cast<uint32_t>(64 * w + __builtin_ctzll(mask));
      }
    }
    fallbacks += nredo;
    // In index order (redone points lie below m8), so the first invalid
    // point found is the block's first.
    for (size_t r = 0; r < nredo; ++r) {
      const size_t k = b + redo[r];
      if (invalid(k)) return finish(static_cast<int64_t>(k));
      out[k] = latlng_to_cell(lat[k], lng[k], level);
    }
    for (size_t k = b + m8; k < b + m; ++k) {
      if (invalid(k)) return finish(static_cast<int64_t>(k));
      out[k] = latlng_to_cell(lat[k], lng[k], level);
    }
  }
  return finish(-1);
}

}  // namespace

GEOCELL_AVX2 void face_ij_to_cell_avx2(const uint32_t* face, const uint32_t* i, const uint32_t* j,
                                       size_t n, uint64_t* out) {
  alignas(32) uint32_t f8[8], i8[8], j8[8];
  for (size_t b = 0; b < n; b += 8) {
    const size_t m = std::min<size_t>(8, n - b);
    for (size_t k = 0; k < 8; ++k) {
      f8[k] = k < m ? face[b + k] : 0;
      i8[k] = k < m ? i[b + k] : 0;
      j8[k] = k < m ? j[b + k] : 0;
    }
    uint64_t ids[8];
    hilbert8<false>(f8, i8, j8, ~uint64_t{0}, 0, ids);
    for (size_t k = 0; k < m; ++k) out[b + k] = ids[k];
  }
}

GEOCELL_AVX2 __attribute__((flatten)) int64_t latlng_to_cell_avx2(const double* lat, const double* lng,
                                                                  size_t n, int level, uint64_t* out,
                                                                  bool stream_out, bool check) {
  return latlng_to_cell_fast<Avx2>(lat, lng, n, level, out, stream_out, check);
}

GEOCELL_AVX512 __attribute__((flatten)) int64_t latlng_to_cell_avx512(const double* lat, const double* lng,
                                                                      size_t n, int level, uint64_t* out,
                                                                      bool stream_out, bool check) {
  return latlng_to_cell_fast<Avx512>(lat, lng, n, level, out, stream_out, check);
}

#else  // not x86: no fast path (avx2_available() is false); same results.

void face_ij_to_cell_avx2(const uint32_t* face, const uint32_t* i, const uint32_t* j, size_t n,
                          uint64_t* out) {
  for (size_t k = 0; k < n; ++k) {
    out[k] = face_ij_to_cell(static_cast<int>(face[k]), static_cast<int>(i[k]), static_cast<int>(j[k]));
  }
}

int64_t latlng_to_cell_avx2(const double* lat, const double* lng, size_t n, int level,
                            uint64_t* out, bool, bool check) {
  if (check) {
    const int64_t bad = find_invalid_latlng(lat, lng, n);
    if (bad >= 0) return bad;
  }
  latlng_to_cell_scalar(lat, lng, n, level, out);
  return -1;
}

int64_t latlng_to_cell_avx512(const double* lat, const double* lng, size_t n, int level,
                              uint64_t* out, bool stream_out, bool check) {
  return latlng_to_cell_avx2(lat, lng, n, level, out, stream_out, check);
}

#endif  // GEOCELL_X86

int64_t latlng_to_cell_fast(SimdLevel path, const double* lat, const double* lng, size_t n, int level,
                            uint64_t* out, bool stream_out, bool check) {
  switch (path) {
    case SimdLevel::kAvx512:
      return latlng_to_cell_avx512(lat, lng, n, level, out, stream_out, check);
    case SimdLevel::kAvx2:
      return latlng_to_cell_avx2(lat, lng, n, level, out, stream_out, check);
    case SimdLevel::kScalar:
      break;
  }
  if (check) {
    const int64_t bad = find_invalid_latlng(lat, lng, n);
    if (bad >= 0) return bad;
  }
  latlng_to_cell_scalar(lat, lng, n, level, out);
  return -1;
}

}  // namespace geocell::detail
