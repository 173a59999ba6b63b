// resample_normalize: separable antialiased bilinear resampling, laid out so
// that both passes run over contiguous memory with one weight per vector.
//
// Per image: the source rows the vertical taps need are taken 8 at a time and
// transposed to [column][8 rows] floats, so the horizontal pass computes 8 rows
// of one output column with broadcast weights. Its results are transposed back
// into planar rows (one plane per channel, mirrored if asked), which the
// vertical pass combines row by row, normalizing as it writes the output.
// The same code is compiled twice: plain, and inside an AVX2+FMA function
// (flatten), where the 8-wide loops become single vector instructions and the
// transposes use shuffles.
#include "geocell/image.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "geocell/s2.h"  // resolve_threads
#include "s2_fast.h"     // detail::avx2_available

#if defined(__x86_64__) || defined(__i386__)
#define GEOCELL_IMAGE_X86 1
#include <immintrin.h>
#endif

namespace geocell {

namespace {

// The taps of one axis: output o reads source pixels first[o] .. first[o] +
// count[o] - 1 with the weights at weight[o * max_count].
struct Taps {
  std::vector<int64_t> first;
  std::vector<int> count;
  std::vector<float> weight;
  int max_count = 0;
};

// Pillow's precompute_coeffs for the bilinear (triangle) filter, which
// torchvision's antialiased resize follows too: the filter widens with the
// downscale factor, taps outside the image are dropped and the rest
// renormalized.
void make_taps(double start, double extent, int64_t in_size, int out_size, Taps& t) {
  const double scale = extent / out_size;
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter_scale;  // the triangle's support is 1
  t.max_count = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weight.assign(static_cast<size_t>(out_size) * t.max_count, 0.0f);
  std::vector<double> w(t.max_count);
  for (int o = 0; o < out_size; ++o) {
    const double center = start + (o + 0.5) * scale;
    // Truncation toward zero, as in Pillow, then clamped to the image.
    const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    const int64_t hi = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size);
    const int n = static_cast<int>(std::clamp<int64_t>(hi - lo, 0, t.max_count));
    double sum = 0;
    for (int k = 0; k < n; ++k) {
      const double x = std::abs((lo + k - center + 0.5) / filter_scale);
      w[k] = x < 1.0 ? 1.0 - x : 0.0;
      sum += w[k];
    }
    for (int k = 0; k < n; ++k) t.weight[static_cast<size_t>(o) * t.max_count + k] = sum > 0 ? float(w[k] / sum) : 0.0f;
    t.first[o] = std::min(lo, in_size);
    t.count[o] = n;
  }
}

// The source span [lo, hi) that the taps read.
void tap_span(const Taps& t, int64_t& lo, int64_t& hi) {
  lo = INT64_MAX;
  hi = 0;
  for (size_t o = 0; o < t.first.size(); ++o) {
    if (t.count[o] == 0) continue;
    lo = std::min(lo, t.first[o]);
    hi = std::max(hi, t.first[o] + t.count[o]);
  }
  if (hi <= lo) lo = hi = 0;
}

struct Scratch {
  Taps cols, rows;
  std::vector<float> block;   // [source column * 3 + channel][8 rows]
  std::vector<float> across;  // [channel][output column][8 rows]
  std::vector<float> planes;  // [channel][source row][output column], horizontally resampled
};

constexpr int64_t round8(int64_t v) { return (v + 7) & ~int64_t{7}; }

// n floats of v starting at a 64-byte boundary: vector loads then never split
// a cache line.
inline float* aligned(std::vector<float>& v, size_t n) {
  if (v.size() < n + 16) v.resize(n + 16);
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((64 - (p & 63)) & 63) / sizeof(float);
}

// 8 floats: one AVX register where the function targets AVX2, two SSE ones
// otherwise.
typedef float V8 __attribute__((vector_size(32)));
inline V8 load8(const float* p) {
  V8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, V8 v) { __builtin_memcpy(p, &v, sizeof v); }

// The plain 8x8 transposes.
struct PlainOps {
  // 8 rows of nk (<= 8) bytes -> block[j * 8 + i] as float.
  static inline void load_transpose(const uint8_t* const rows[8], int nk, float* block) {
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 8; ++i) block[j * 8 + i] = j < nk ? float(rows[i][j]) : 0.0f;
  }
  // src[j * 8 + i] -> dst[i][j] for the first nr rows.
  static inline void transpose_store(const float* src, float* const dst[8], int nr) {
    for (int i = 0; i < nr; ++i)
      for (int j = 0; j < 8; ++j) dst[i][j] = src[j * 8 + i];
  }
  // An output store that bypasses the caches (p aligned to the vector); plain here.
  static inline void stream(float* p, V8 v) { store8(p, v); }
  static inline void fence() {}
};

#ifdef GEOCELL_IMAGE_X86
#define GEOCELL_AVX2 __attribute__((target("avx2,fma")))

GEOCELL_AVX2 inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4,
                                    __m256& r5, __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

struct Avx2Ops {
  GEOCELL_AVX2 static inline __m256 bytes8(const uint8_t* p, int nk) {
    if (nk == 8) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
    // The row's last bytes: never read past them.
    alignas(16) uint8_t tail[16] = {};
    for (int j = 0; j < nk; ++j) tail[j] = p[j];
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail))));
  }
  GEOCELL_AVX2 static inline void load_transpose(const uint8_t* const rows[8], int nk, float* block) {
    __m256 r0 = bytes8(rows[0], nk), r1 = bytes8(rows[1], nk), r2 = bytes8(rows[2], nk),
           r3 = bytes8(rows[3], nk), r4 = bytes8(rows[4], nk), r5 = bytes8(rows[5], nk),
           r6 = bytes8(rows[6], nk), r7 = bytes8(rows[7], nk);
    transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
    _mm256_storeu_ps(block + 0, r0);
    _mm256_storeu_ps(block + 8, r1);
    _mm256_storeu_ps(block + 16, r2);
    _mm256_storeu_ps(block + 24, r3);
    _mm256_storeu_ps(block + 32, r4);
    _mm256_storeu_ps(block + 40, r5);
    _mm256_storeu_ps(block + 48, r6);
    _mm256_storeu_ps(block + 56, r7);
  }
  GEOCELL_AVX2 static inline void transpose_store(const float* src, float* const dst[8], int nr) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + 8), r2 = _mm256_loadu_ps(src + 16),
           r3 = _mm256_loadu_ps(src + 24), r4 = _mm256_loadu_ps(src + 32), r5 = _mm256_loadu_ps(src + 40),
           r6 = _mm256_loadu_ps(src + 48), r7 = _mm256_loadu_ps(src + 56);
    transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
    const __m256 out[8] = {r0, r1, r2, r3, r4, r5, r6, r7};
    for (int i = 0; i < nr; ++i) _mm256_storeu_ps(dst[i], out[i]);
  }
  // A batch is tens of MB, far beyond the caches: non-temporal stores skip
  // reading each output line before writing it.
  GEOCELL_AVX2 static inline void stream(float* p, V8 v) { _mm256_stream_ps(p, (__m256)v); }
  GEOCELL_AVX2 static inline void fence() { _mm_sfence(); }
};

#endif

// One image, source rows in blocks of R = 8 (one vector V of 8 floats).
template <class Ops>
inline void resample_one(const ImageU8& im, const PixelBox& box, bool flip, int out_h, int out_w,
                         const float scale[3], const float bias[3], float* out, Scratch& s) {
  constexpr int R = 8;
  using V = V8;
  make_taps(box.left, box.width, im.width, out_w, s.cols);
  make_taps(box.top, box.height, im.height, out_h, s.rows);
  int64_t col_lo, col_hi, row_lo, row_hi;
  tap_span(s.cols, col_lo, col_hi);
  tap_span(s.rows, row_lo, row_hi);
  const int64_t n_rows = row_hi - row_lo, k_total = (col_hi - col_lo) * 3, stride_w = round8(out_w);
  float* block = aligned(s.block, static_cast<size_t>(round8(k_total)) * R);
  float* across = aligned(s.across, static_cast<size_t>(3 * stride_w) * R);
  float* planes = aligned(s.planes, static_cast<size_t>(3 * std::max<int64_t>(n_rows, 1) * stride_w));
  const int mc = s.cols.max_count;

  for (int64_t r0 = row_lo; r0 < row_hi; r0 += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, row_hi - r0));
    // block[k][i] = source row r0 + i, element col_lo * 3 + k, as float.
    const uint8_t* src[R];
    for (int i = 0; i < R; ++i) src[i] = im.data + (r0 + std::min(i, nr - 1)) * im.row_stride + col_lo * 3;
    for (int64_t k0 = 0; k0 < k_total; k0 += 8) {
      const uint8_t* at[R];
      for (int i = 0; i < R; ++i) at[i] = src[i] + k0;
      Ops::load_transpose(at, static_cast<int>(std::min<int64_t>(8, k_total - k0)), block + k0 * R);
    }
    // Horizontal: R rows of output columns x and x + 1 (all three channels)
    // at once; six independent sums keep the FMA units busy.
    auto column = [&](int x, V& a0, V& a1, V& a2, int from) {
      const float* w = &s.cols.weight[static_cast<size_t>(x) * mc];
      const float* p = block + ((s.cols.first[x] - col_lo) * 3 + from * 3) * R;
      for (int t = from; t < s.cols.count[x]; ++t, p += 3 * R) {
        a0 += w[t] * load8(p);
        a1 += w[t] * load8(p + R);
        a2 += w[t] * load8(p + 2 * R);
      }
    };
    auto put = [&](int x, const V& a0, const V& a1, const V& a2) {
      const int xo = flip ? out_w - 1 - x : x;
      store8(across + (0 * stride_w + xo) * R, a0);
      store8(across + (1 * stride_w + xo) * R, a1);
      store8(across + (2 * stride_w + xo) * R, a2);
    };
    int x = 0;
    for (; x + 2 <= out_w; x += 2) {
      const int n = std::min(s.cols.count[x], s.cols.count[x + 1]);
      const float* w0 = &s.cols.weight[static_cast<size_t>(x) * mc];
      const float* w1 = w0 + mc;
      const float* p0 = block + (s.cols.first[x] - col_lo) * 3 * R;
      const float* p1 = block + (s.cols.first[x + 1] - col_lo) * 3 * R;
      V a0 = {}, a1 = {}, a2 = {}, b0 = {}, b1 = {}, b2 = {};
      for (int t = 0; t < n; ++t, p0 += 3 * R, p1 += 3 * R) {
        a0 += w0[t] * load8(p0);
        b0 += w1[t] * load8(p1);
        a1 += w0[t] * load8(p0 + R);
        b1 += w1[t] * load8(p1 + R);
        a2 += w0[t] * load8(p0 + 2 * R);
        b2 += w1[t] * load8(p1 + 2 * R);
      }
      column(x, a0, a1, a2, n);
      column(x + 1, b0, b1, b2, n);
      put(x, a0, a1, a2);
      put(x + 1, b0, b1, b2);
    }
    if (x < out_w) {
      V a0 = {}, a1 = {}, a2 = {};
      column(x, a0, a1, a2, 0);
      put(x, a0, a1, a2);
    }
    // Back to rows: planes[c][r][x].
    for (int c = 0; c < 3; ++c) {
      for (int64_t x0 = 0; x0 < out_w; x0 += 8) {
        float* dst[R];
        for (int i = 0; i < R; ++i) dst[i] = planes + (c * n_rows + (r0 - row_lo) + std::min(i, nr - 1)) * stride_w + x0;
        Ops::transpose_store(across + (c * stride_w + x0) * R, dst, nr);
      }
    }
  }

  // Vertical, then (v / 255 - mean) / std, R columns per vector, four
  // independent sums where the row is long enough.
  const int mr = s.rows.max_count;
  for (int c = 0; c < 3; ++c) {
    const float* plane = planes + c * n_rows * stride_w;
    const V sc = V{} + scale[c], bi = V{} + bias[c];
    for (int y = 0; y < out_h; ++y) {
      float* dst = out + (static_cast<int64_t>(c) * out_h + y) * out_w;
      const int n = s.rows.count[y];
      const float* w = &s.rows.weight[static_cast<size_t>(y) * mr];
      const float* top = plane + (s.rows.first[y] - row_lo) * stride_w;
      const bool stream = reinterpret_cast<uintptr_t>(dst) % sizeof(V) == 0;
      auto put = [&](float* p, V v) {
        if (stream) {
          Ops::stream(p, v);
        } else {
          store8(p, v);
        }
      };
      int64_t x0 = 0;
      for (; x0 + 4 * R <= out_w; x0 += 4 * R) {
        V a0 = {}, a1 = {}, a2 = {}, a3 = {};
        const float* p = top + x0;
        for (int t = 0; t < n; ++t, p += stride_w) {
          a0 += w[t] * load8(p);
          a1 += w[t] * load8(p + R);
          a2 += w[t] * load8(p + 2 * R);
          a3 += w[t] * load8(p + 3 * R);
        }
        put(dst + x0, a0 * sc + bi);
        put(dst + x0 + R, a1 * sc + bi);
        put(dst + x0 + 2 * R, a2 * sc + bi);
        put(dst + x0 + 3 * R, a3 * sc + bi);
      }
      for (; x0 < out_w; x0 += R) {
        V acc = {};
        const float* p = top + x0;  // planes rows are padded to 8: whole vectors stay inside
        for (int t = 0; t < n; ++t, p += stride_w) acc += w[t] * load8(p);
        acc = acc * sc + bi;
        if (x0 + R <= out_w) {
          put(dst + x0, acc);
        } else {  // the row's last columns: the output has no padding
          float last[R];
          store8(last, acc);
          for (int64_t k = x0; k < out_w; ++k) dst[k] = last[k - x0];
        }
      }
    }
  }
  Ops::fence();  // the streamed stores are visible before the caller reads them
}

using OneImage = void (*)(const ImageU8&, const PixelBox&, bool, int, int, const float*, const float*,
                          float*, Scratch&);

void resample_plain(const ImageU8& im, const PixelBox& box, bool flip, int out_h, int out_w,
                    const float* scale, const float* bias, float* out, Scratch& s) {
  resample_one<PlainOps>(im, box, flip, out_h, out_w, scale, bias, out, s);
}

#ifdef GEOCELL_IMAGE_X86
GEOCELL_AVX2 __attribute__((flatten)) void resample_avx2(const ImageU8& im, const PixelBox& box, bool flip,
                                                         int out_h, int out_w, const float* scale,
                                                         const float* bias, float* out, Scratch& s) {
  resample_one<Avx2Ops>(im, box, flip, out_h, out_w, scale, bias, out, s);
}

#endif

// The paths, worst to best; g_image_level < 0: the best this CPU has. (An
// AVX-512 build with 16-row blocks measured slower than AVX2 on an AVX-512
// Xeon: the kernel is bound by memory and transposes, not multiply-adds.)
const char* const kLevelNames[] = {"scalar", "avx2"};
std::atomic<int> g_image_level{-1};

int best_level() { return detail::avx2_available() ? 1 : 0; }

int current_level() {
  const int l = g_image_level.load();
  return l < 0 ? best_level() : l;
}

void check_inputs(const ImageU8* images, const PixelBox* boxes, size_t n, int out_h, int out_w,
                  const float stdev[3]) {
  if (out_h <= 0 || out_w <= 0) throw std::invalid_argument("output size must be positive");
  for (int c = 0; c < 3; ++c) {
    if (!(stdev[c] != 0.0f) || !std::isfinite(stdev[c])) throw std::invalid_argument("std must be finite and non-zero");
  }
  for (size_t i = 0; i < n; ++i) {
    const ImageU8& im = images[i];
    const PixelBox& b = boxes[i];
    const std::string where = "image " + std::to_string(i) + ": ";
    if (im.height <= 0 || im.width <= 0 || im.data == nullptr) throw std::invalid_argument(where + "empty image");
    if (im.row_stride < 3 * im.width) throw std::invalid_argument(where + "row stride shorter than a row");
    // Inside the image (a rounding slack of 1e-6 px), positive size.
    const double slack = 1e-6;
    if (!(b.width > 0 && b.height > 0 && b.left >= -slack && b.top >= -slack &&
          b.left + b.width <= im.width + slack && b.top + b.height <= im.height + slack)) {
      throw std::invalid_argument(where + "box (" + std::to_string(b.left) + ", " + std::to_string(b.top) + ", " +
                                  std::to_string(b.width) + ", " + std::to_string(b.height) +
                                  ") is empty or not inside the " + std::to_string(im.width) + "x" +
                                  std::to_string(im.height) + " image");
    }
  }
}

// Scratch buffers outlive the call: allocating them afresh (about 1 MB) costs
// page faults on every batch.
std::mutex g_scratch_mutex;
std::vector<std::unique_ptr<Scratch>> g_scratch;

std::unique_ptr<Scratch> take_scratch() {
  std::lock_guard<std::mutex> lock(g_scratch_mutex);
  if (g_scratch.empty()) return std::make_unique<Scratch>();
  auto s = std::move(g_scratch.back());
  g_scratch.pop_back();
  return s;
}

void give_back_scratch(std::unique_ptr<Scratch> s) {
  std::lock_guard<std::mutex> lock(g_scratch_mutex);
  if (g_scratch.size() < 64) g_scratch.push_back(std::move(s));
}

}  // namespace

std::vector<std::string> image_simd_levels() {
  std::vector<std::string> names;
  for (int l = best_level(); l >= 0; --l) names.emplace_back(kLevelNames[l]);
  return names;
}

std::string image_simd_level() { return kLevelNames[current_level()]; }

void set_image_simd_level(const std::string& level) {
  for (int l = 0; l <= best_level(); ++l) {
    if (level == kLevelNames[l]) {
      g_image_level.store(l);
      return;
    }
  }
  std::string known;
  for (const auto& name : image_simd_levels()) known += (known.empty() ? "" : ", ") + name;
  throw std::invalid_argument("image simd level must be one of " + known + " on this CPU, got '" + level + "'");
}

void resample_normalize(const ImageU8* images, const PixelBox* boxes, const uint8_t* flip, size_t n,
                        int out_h, int out_w, const float mean[3], const float stdev[3], float* out,
                        int threads) {
  check_inputs(images, boxes, n, out_h, out_w, stdev);
  float scale[3], bias[3];
  for (int c = 0; c < 3; ++c) {
    scale[c] = 1.0f / (255.0f * stdev[c]);
    bias[c] = -mean[c] / stdev[c];
  }
  OneImage one = resample_plain;
#ifdef GEOCELL_IMAGE_X86
  if (current_level() == 1) one = resample_avx2;
#endif
  const size_t per_image = static_cast<size_t>(3) * out_h * out_w;
  std::atomic<size_t> next{0};
  auto work = [&]() {
    std::unique_ptr<Scratch> s = take_scratch();
    for (size_t i; (i = next.fetch_add(1)) < n;) {
      one(images[i], boxes[i], flip != nullptr && flip[i] != 0, out_h, out_w, scale, bias, out + i * per_image, *s);
    }
    give_back_scratch(std::move(s));
  };
  const size_t t = std::min<size_t>(resolve_threads(threads), n);
  std::vector<std::thread> pool;
  for (size_t k = 1; k < t; ++k) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

}  // namespace geocell
