// Tests of the S2 core: the golden corpus from Google's C++ library, the fast
// path against the scalar path over many random and adversarial points, and
// invariants ported from s2geometry's s2cell_id_test.cc.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "geocell/s2.h"
#include "s2_fast.h"
#include "s2_internal.h"
#include "test_util.h"

using namespace geocell;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_UNDEFINED__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

// Sanitizers slow the core several times: keep that run well under a minute.
size_t scaled(size_t n) { return kSanitized ? n / 2 : n; }

struct CorpusRow {
  double lat, lng;
  int level;
  uint64_t id;
  std::string token;
};

std::vector<CorpusRow> read_corpus() {
  const std::string path = geocell_test::source_dir + "/tests/data/s2_encode_corpus.csv.gz";
  const std::string cmd = "gzip -dc '" + path + "'";
  std::vector<CorpusRow> rows;
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return rows;
  char line[256];
  bool header = true;
  while (std::fgets(line, sizeof line, f)) {
    if (header) {
      header = false;
      continue;
    }
    CorpusRow r;
    char token[32];
    if (std::sscanf(line, "%lf,%lf,%d,%" SCNu64 ",%31s", &r.lat, &r.lng, &r.level, &r.id, token) == 5) {
      r.token = token;
      rows.push_back(r);
    }
  }
  pclose(f);
  return rows;
}

// Points on and within a few ulps of cell vertices and edges: where the fast
// path's sin/cos error could move a point into a neighbouring cell.
void add_adversarial(std::mt19937_64& rng, size_t n, std::vector<double>& lat,
                     std::vector<double>& lng) {
  std::uniform_int_distribution<int> level_dist(0, kMaxLevel);
  std::uniform_int_distribution<int> face_dist(0, 5);
  std::uniform_int_distribution<uint32_t> ij_dist(0, (1u << kMaxLevel) - 1);
  std::uniform_int_distribution<int> ulps(-4, 4);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  auto nudge = [&](double x) {
    for (int k = ulps(rng); k != 0; k += (k > 0 ? -1 : 1)) {
      x = std::nextafter(x, k > 0 ? INFINITY : -INFINITY);
    }
    return x;
  };
  for (size_t k = 0; k < n; ++k) {
    const uint64_t leaf = face_ij_to_cell(face_dist(rng), static_cast<int>(ij_dist(rng)),
                                          static_cast<int>(ij_dist(rng)));
    const uint64_t cell = cell_to_parent(leaf, level_dist(rng));
    double b[8];
    cell_to_boundary(cell, b);
    const int v = static_cast<int>(k % 4);
    double la = b[2 * v], ln = b[2 * v + 1];
    if (k % 3 == 1) {  // a point on an edge, between two vertices
      const int w = (v + 1) % 4;
      const double t = unit(rng);
      la = la + t * (b[2 * w] - la);
      ln = (std::fabs(b[2 * w + 1] - ln) < 180) ? ln + t * (b[2 * w + 1] - ln) : ln;
    }
    la = nudge(la);
    ln = nudge(ln);
    if (k % 5 == 2) ln += (k % 2 ? 360.0 : -360.0);  // beyond +-180
    lat.push_back(std::max(-90.0, std::min(90.0, la)));
    lng.push_back(ln);
  }
}

// The vector paths this CPU runs (AVX-512 first).
std::vector<detail::SimdLevel> fast_paths() {
  std::vector<detail::SimdLevel> paths;
  if (detail::avx512_available()) paths.push_back(detail::SimdLevel::kAvx512);
  if (detail::avx2_available()) paths.push_back(detail::SimdLevel::kAvx2);
  return paths;
}

const char* path_name(detail::SimdLevel p) {
  return p == detail::SimdLevel::kAvx512 ? "avx512" : p == detail::SimdLevel::kAvx2 ? "avx2" : "scalar";
}

size_t compare_fast_scalar(detail::SimdLevel path, const std::vector<double>& lat,
                           const std::vector<double>& lng, int level) {
  const size_t n = lat.size();
  std::vector<uint64_t> fast(n), slow(n);
  detail::latlng_to_cell_fast(path, lat.data(), lng.data(), n, level, fast.data());
  detail::latlng_to_cell_scalar(lat.data(), lng.data(), n, level, slow.data());
  // Streamed output, from every alignment of the first id (on a prefix).
  const size_t ns = std::min<size_t>(n, 300'000);
  for (size_t offset = 0; offset < 4; ++offset) {
    std::vector<uint64_t> streamed(ns + 4, 0);
    detail::latlng_to_cell_fast(path, lat.data(), lng.data(), ns, level, streamed.data() + offset, true);
    if (!std::equal(slow.begin(), slow.begin() + static_cast<std::ptrdiff_t>(ns),
                    streamed.begin() + static_cast<std::ptrdiff_t>(offset))) {
      std::fprintf(stderr, "%s: streamed output (offset %zu) differs\n", path_name(path), offset);
      return n;
    }
  }
  size_t bad = 0;
  for (size_t k = 0; k < n; ++k) {
    if (fast[k] != slow[k]) {
      if (++bad <= 5) {
        std::fprintf(stderr, "%s != scalar at lat=%.17g lng=%.17g level %d: %016" PRIx64
                             " vs %016" PRIx64 "\n", path_name(path), lat[k], lng[k], level, fast[k], slow[k]);
      }
    }
  }
  return bad;
}

}  // namespace

TEST(s2_corpus_matches_google) {
  const auto rows = read_corpus();
  CHECK_EQ(rows.size(), size_t{111600});
  size_t bad = 0;
  std::vector<double> lat, lng;
  for (const auto& r : rows) {
    char token[17];
    cell_to_token(r.id, token);
    const uint64_t got = latlng_to_cell(r.lat, r.lng, r.level);
    if (got != r.id || cell_level(r.id) != r.level || r.token != token) ++bad;
    uint64_t parsed = 0;
    if (!token_to_cell(r.token.data(), r.token.size(), &parsed) || parsed != r.id) ++bad;
  }
  CHECK_EQ(bad, size_t{0});
  // The batch kernel (fast path where available), per level.
  for (int level = 0; level <= kMaxLevel; ++level) {
    std::vector<double> la, ln;
    std::vector<uint64_t> want;
    for (const auto& r : rows) {
      if (r.level == level) {
        la.push_back(r.lat);
        ln.push_back(r.lng);
        want.push_back(r.id);
      }
    }
    std::vector<uint64_t> got(la.size());
    latlng_to_cell_batch(la.data(), ln.data(), la.size(), level, got.data(), 2);
    CHECK(got == want);
  }
}

TEST(s2_fast_hilbert_matches_scalar) {
  if (!detail::avx2_available()) return;
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<uint32_t> ij(0, (1u << kMaxLevel) - 1);
  const size_t n = 300003;
  std::vector<uint32_t> face(n), i(n), j(n);
  for (size_t k = 0; k < n; ++k) {
    face[k] = static_cast<uint32_t>(k % 6);
    // Every 16th point on the face's edges and corners.
    i[k] = (k % 16 == 0) ? (k % 32 == 0 ? 0 : (1u << kMaxLevel) - 1) : ij(rng);
    j[k] = (k % 16 == 8) ? 0 : ij(rng);
  }
  std::vector<uint64_t> got(n);
  detail::face_ij_to_cell_avx2(face.data(), i.data(), j.data(), n, got.data());
  size_t bad = 0;
  for (size_t k = 0; k < n; ++k) {
    if (got[k] != face_ij_to_cell(static_cast<int>(face[k]), static_cast<int>(i[k]), static_cast<int>(j[k]))) ++bad;
  }
  CHECK_EQ(bad, size_t{0});
}

TEST(s2_fast_path_matches_scalar_random) {
  if (fast_paths().empty()) {
    std::printf("     (no AVX2/FMA on this CPU: fast path not tested)\n");
    return;
  }
  // Each vector path on its own points (the same count each).
  for (const detail::SimdLevel path : fast_paths()) {
    std::mt19937_64 rng(path == detail::SimdLevel::kAvx2 ? 12345 : 54321);
    std::uniform_real_distribution<double> u01(0.0, 1.0), lng_wide(-720.0, 720.0);
    const size_t total = scaled(16'000'000), block = 1'000'000;
    size_t bad = 0, fallbacks = 0;
    for (size_t done = 0; done < total; done += block) {
      std::vector<double> lat(block), lng(block);
      for (size_t k = 0; k < block; ++k) {
        // Uniform on the sphere; every 8th longitude outside [-180, 180].
        lat[k] = std::asin(2 * u01(rng) - 1) * (180.0 / M_PI);
        lng[k] = (k % 8 == 0) ? lng_wide(rng) : 360.0 * u01(rng) - 180.0;
      }
      bad += compare_fast_scalar(path, lat, lng, kMaxLevel);
      fallbacks += detail::avx2_fallback_count();
    }
    CHECK_EQ(bad, size_t{0});
    std::printf("     %s: %zu random points, %zu (%.1e) redone by the scalar path\n", path_name(path), total,
                fallbacks, static_cast<double>(fallbacks) / static_cast<double>(total));
  }
}

TEST(s2_fast_path_matches_scalar_adversarial) {
  if (fast_paths().empty()) return;
  std::mt19937_64 rng(99);
  std::vector<double> lat, lng;
  add_adversarial(rng, scaled(4'000'000), lat, lng);
  // Poles, +-180, +-0, face boundaries (lng multiples of 45, lat +-35.26...),
  // the fast path's range limit, and values it must hand to the scalar path.
  const double specials_lat[] = {90, -90, 0, -0.0, 35.264389682754654, -35.264389682754654,
                                 45, -45, 89.999999999, -89.999999999, 1e-300, -1e-300,
                                 std::nextafter(90.0, 0.0), 4.9e-324};
  const double specials_lng[] = {180, -180, 0, -0.0, 45, -45, 135, -135, 90, -90, 360, -360,
                                 540, 1440, -1440, 1440.0000000000002, 1e6, -1e6, 1e300,
                                 179.99999999999997, -179.99999999999997, 4.9e-324};
  for (double la : specials_lat) {
    for (double ln : specials_lng) {
      for (int d = -3; d <= 3; ++d) {
        double a = la, b = ln;
        for (int s = 0; s < std::abs(d); ++s) {
          a = std::nextafter(a, d > 0 ? INFINITY : -INFINITY);
          b = std::nextafter(b, d > 0 ? INFINITY : -INFINITY);
        }
        lat.push_back(std::max(-90.0, std::min(90.0, a)));
        lng.push_back(b);
      }
    }
  }
  const std::vector<double> lat_copy = lat, lng_copy = lng;
  for (const detail::SimdLevel path : fast_paths()) {
    CHECK_EQ(compare_fast_scalar(path, lat, lng, kMaxLevel), size_t{0});
    std::printf("     %s: %zu adversarial points, %zu redone by the scalar path\n", path_name(path), lat.size(),
                detail::avx2_fallback_count());
    for (int level : {0, 1, 7, 15, 29}) CHECK_EQ(compare_fast_scalar(path, lat, lng, level), size_t{0});
    // Ragged lengths exercise the block tails.
    for (size_t n : {size_t{0}, size_t{1}, size_t{3}, size_t{5}, size_t{9}, size_t{255}, size_t{257}}) {
      std::vector<double> a(lat.begin(), lat.begin() + n), b(lng.begin(), lng.begin() + n);
      CHECK_EQ(compare_fast_scalar(path, a, b, kMaxLevel), size_t{0});
    }
  }
}

TEST(s2_batch_threads_agree) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> la(-90, 90), ln(-180, 180);
  const size_t n = 200003;
  std::vector<double> lat(n), lng(n);
  for (size_t k = 0; k < n; ++k) {
    lat[k] = la(rng);
    lng[k] = ln(rng);
  }
  std::vector<uint64_t> base(n), one(n), many(n);
  set_simd_level("scalar");
  CHECK(simd_level() == "scalar");
  latlng_to_cell_batch(lat.data(), lng.data(), n, 30, base.data(), 0);
  // Every path this CPU runs, through the public switch.
  const std::vector<std::string> levels = simd_levels();
  CHECK(!levels.empty() && levels.back() == "scalar");
  CHECK((levels.front() == "avx512") == detail::avx512_available());
  for (const std::string& level : levels) {
    set_simd_level(level);
    CHECK(simd_level() == level);
    latlng_to_cell_batch(lat.data(), lng.data(), n, 30, one.data(), 1);
    latlng_to_cell_batch(lat.data(), lng.data(), n, 30, many.data(), 7);
    CHECK(one == base);
    CHECK(many == base);
  }
  bool threw = false;
  try {
    set_simd_level("avx1024");
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  CHECK(simd_level() == levels.back());
  set_simd_enabled(true);
  CHECK(simd_level() == levels.front());
}

TEST(s2_invariants) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  size_t bad_parent = 0, bad_child = 0, bad_token = 0, bad_centre = 0, bad_range = 0;
  for (int n = 0; n < 20000; ++n) {
    const double lat = std::asin(2 * u01(rng) - 1) * (180.0 / M_PI), lng = 360 * u01(rng) - 180;
    const int level = n % (kMaxLevel + 1);
    const uint64_t c = latlng_to_cell(lat, lng, level);
    if (!is_valid_cell(c) || cell_level(c) != level) ++bad_parent;
    // Parents contain their children and the leaf; children tile the range.
    if (cell_to_parent(latlng_to_cell(lat, lng), level) != c) ++bad_parent;
    if (!cell_contains(c, latlng_to_cell(lat, lng))) ++bad_parent;
    if (level < kMaxLevel) {
      for (int k = 0; k < 4; ++k) {
        const uint64_t ch = cell_child(c, k);
        if (cell_level(ch) != level + 1 || cell_to_parent(ch, level) != c || !cell_contains(c, ch))
          ++bad_child;
      }
      if (cell_range_min(cell_child(c, 0)) != cell_range_min(c) ||
          cell_range_max(cell_child(c, 3)) != cell_range_max(c))
        ++bad_range;
    }
    if (cell_range_min(c) > c || cell_range_max(c) < c || !(cell_range_min(c) & 1) ||
        !(cell_range_max(c) & 1))
      ++bad_range;
    char tok[17];
    const int len = cell_to_token(c, tok);
    uint64_t back = 0;
    if (!token_to_cell(tok, static_cast<size_t>(len), &back) || back != c) ++bad_token;
    double clat, clng;
    cell_to_latlng(c, &clat, &clng);
    if (latlng_to_cell(clat, clng, level) != c) ++bad_centre;
  }
  CHECK_EQ(bad_parent, size_t{0});
  CHECK_EQ(bad_child, size_t{0});
  CHECK_EQ(bad_token, size_t{0});
  CHECK_EQ(bad_centre, size_t{0});
  CHECK_EQ(bad_range, size_t{0});
}

TEST(s2_hilbert_continuity) {
  // Consecutive cells at a level are edge neighbours: their (i, j) differ by
  // one cell size along one axis, or they share an edge across faces (then
  // two boundary vertices coincide).
  std::mt19937_64 rng(11);
  size_t bad = 0;
  for (int level = 1; level <= kMaxLevel; level += 1) {
    const uint64_t step = lowest_bit_at_level(level) << 1;
    const uint64_t first = cell_to_parent(face_ij_to_cell(0, 0, 0), level);
    for (int n = 0; n < 300; ++n) {
      uint64_t c = first + step * (rng() % ((6ull << (2 * level)) - 1));
      const uint64_t d = c + step;
      int ci, cj, di, dj;
      const int cf = cell_to_face_ij(c, &ci, &cj), df = cell_to_face_ij(d, &di, &dj);
      const int size = 1 << (kMaxLevel - level);
      if (cf == df) {
        const int dist = std::abs((ci & -size) - (di & -size)) + std::abs((cj & -size) - (dj & -size));
        if (dist != size) ++bad;
      } else {
        double a[8], b[8];
        cell_to_boundary(c, a);
        cell_to_boundary(d, b);
        int shared = 0;
        for (int p = 0; p < 4; ++p)
          for (int q = 0; q < 4; ++q)
            if (std::fabs(a[2 * p] - b[2 * q]) < 1e-9 && std::fabs(a[2 * p + 1] - b[2 * q + 1]) < 1e-9)
              ++shared;
        if (shared < 2) ++bad;
      }
    }
  }
  CHECK_EQ(bad, size_t{0});
}

TEST(s2_tokens_and_validation) {
  char tok[17];
  CHECK_EQ(cell_to_token(0, tok), 1);
  CHECK(std::strcmp(tok, "X") == 0);
  uint64_t id = 0;
  CHECK(token_to_cell("89c25", 5, &id));
  CHECK_EQ(id, uint64_t{0x89c2500000000000ULL});
  CHECK(!token_to_cell("", 0, &id));
  CHECK(!token_to_cell("12345678901234567", 17, &id));
  CHECK(!token_to_cell("89g", 3, &id));
  const char fields[3 * 16 + 1] = "89c25\0\0\0\0\0\0\0\0\0\0\0" "b\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0" "c\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
  uint64_t out[3];
  CHECK_EQ(token_to_cell_batch(fields, 16, 3, out), int64_t{2});  // face 6
  CHECK_EQ(token_to_cell_batch(fields, 16, 2, out), int64_t{-1});
  const double lat[] = {0, 91, 0}, lng[] = {0, 0, NAN};
  CHECK_EQ(find_invalid_latlng(lat, lng, 3), int64_t{1});
  CHECK_EQ(find_invalid_latlng(lat, lng, 1), int64_t{-1});
  const double lat2[] = {0, 0, -90}, lng2[] = {1e308, INFINITY, 0};
  CHECK_EQ(find_invalid_latlng(lat2, lng2, 3), int64_t{1});
  const uint64_t cells[] = {0x89c2500000000000ULL, 0, 0xe000000000000000ULL | 1};
  CHECK_EQ(find_invalid_cell(cells, 3), int64_t{1});
  CHECK(!is_valid_cell(0xe000000000000001ULL));
  CHECK(!is_valid_cell(0x8000000000000002ULL));  // level marker at an odd bit
  CHECK(is_valid_cell(0x1000000000000000ULL));   // face 0 itself
  CHECK_EQ(great_circle_km(0, 0, 0, 180), M_PI * 6371.0);
}

TEST(s2_checked_batch_reports_first_bad_point) {
  const size_t n = 300000;
  std::vector<double> lat(n, 10.0), lng(n, 20.0);
  std::vector<uint64_t> out(n);
  CHECK_EQ(latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30, out.data(), 4), int64_t{-1});
  CHECK_EQ(out[n - 1], latlng_to_cell(10.0, 20.0));
  // Bad points in several threads' chunks: the first one wins.
  lat[250000] = NAN;
  lng[200001] = INFINITY;
  lat[100003] = 90.5;
  for (int threads : {1, 2, 4, 7}) {
    CHECK_EQ(latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30, out.data(), threads),
             int64_t{100003});
  }
  CHECK_EQ(find_invalid_latlng(lat.data(), lng.data(), n), int64_t{100003});
  CHECK_EQ(find_invalid_latlng(lat.data() + 100004, lng.data() + 100004, n - 100004), int64_t{200001 - 100004});
}

TEST(s2_checked_batch_matches_find_invalid) {
  // One bad value at many positions (head, blocks, tail), both paths, several
  // output alignments: the kernel reports exactly what find_invalid_latlng does.
  std::mt19937_64 rng(21);
  const size_t n = (size_t{1} << 18) + 13;
  std::vector<double> lat(n), lng(n);
  std::uniform_real_distribution<double> la(-90, 90), ln(-720, 720);
  for (size_t k = 0; k < n; ++k) {
    lat[k] = la(rng);
    lng[k] = ln(rng);
  }
  const double bad_lat[] = {NAN, 90.000000000001, -1e300, INFINITY};
  const double bad_lng[] = {NAN, INFINITY, -INFINITY};
  std::vector<uint64_t> out(n + 4);
  size_t wrong = 0;
  const size_t positions[] = {0, 1, 2, 7, 255, 256, 4099, 100000, n - 14, n - 9, n - 1};
  for (const std::string& simd : simd_levels()) {
    set_simd_level(simd);
    for (size_t p = 0; p < sizeof(positions) / sizeof(positions[0]); ++p) {
      const size_t pos = positions[p];
      const bool use_lat = p % 2 == 0;
      const double saved = use_lat ? lat[pos] : lng[pos];
      (use_lat ? lat[pos] : lng[pos]) = use_lat ? bad_lat[p % 4] : bad_lng[p % 3];
      const int64_t want = find_invalid_latlng(lat.data(), lng.data(), n);
      for (int threads : {1, 3}) {
        const int64_t got = latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30,
                                                         out.data() + p % 4, threads);
        if (got != want || want != static_cast<int64_t>(pos)) ++wrong;
      }
      (use_lat ? lat[pos] : lng[pos]) = saved;
    }
  }
  set_simd_enabled(true);
  CHECK_EQ(wrong, size_t{0});
  std::vector<uint64_t> want(n);
  latlng_to_cell_batch(lat.data(), lng.data(), n, 30, want.data(), 1);
  CHECK_EQ(latlng_to_cell_batch_checked(lat.data(), lng.data(), n, 30, out.data() + 1, 2), int64_t{-1});
  CHECK(std::equal(want.begin(), want.end(), out.begin() + 1));
}
