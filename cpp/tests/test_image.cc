// resample_normalize against a direct double-precision evaluation of the
// same filter (Pillow's bilinear resize), on both vector paths.
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "geocell/image.h"
#include "test_util.h"

namespace {

// Pillow's taps for output o of one axis, written out plainly.
std::vector<std::pair<int64_t, double>> reference_taps(double start, double extent, int64_t in_size,
                                                       int out_size, int o) {
  const double scale = extent / out_size, fs = scale > 1 ? scale : 1.0;
  const double center = start + (o + 0.5) * scale;
  int64_t lo = static_cast<int64_t>(center - fs + 0.5), hi = static_cast<int64_t>(center + fs + 0.5);
  if (lo < 0) lo = 0;
  if (hi > in_size) hi = in_size;
  std::vector<std::pair<int64_t, double>> taps;
  double sum = 0;
  for (int64_t x = lo; x < hi; ++x) {
    const double d = std::fabs((x - center + 0.5) / fs);
    taps.push_back({x, d < 1 ? 1 - d : 0});
    sum += taps.back().second;
  }
  for (auto& t : taps) t.second /= sum;
  return taps;
}

struct Case {
  int64_t h, w, stride;
  std::vector<uint8_t> pixels;
  geocell::PixelBox box;
  bool flip;
};

std::vector<float> reference(const Case& k, int oh, int ow, const float mean[3], const float sd[3]) {
  std::vector<float> out(3 * oh * ow);
  for (int y = 0; y < oh; ++y) {
    const auto ty = reference_taps(k.box.top, k.box.height, k.h, oh, y);
    for (int x = 0; x < ow; ++x) {
      const auto tx = reference_taps(k.box.left, k.box.width, k.w, ow, x);
      for (int c = 0; c < 3; ++c) {
        double v = 0;
        for (auto [sy, wy] : ty)
          for (auto [sx, wx] : tx) v += wy * wx * k.pixels[sy * k.stride + sx * 3 + c];
        const int xo = k.flip ? ow - 1 - x : x;
        out[(c * oh + y) * ow + xo] = float((v / 255.0 - mean[c]) / sd[c]);
      }
    }
  }
  return out;
}

Case random_case(std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> side(1, 90);
  Case k;
  k.h = side(rng);
  k.w = side(rng);
  k.stride = k.w * 3 + std::uniform_int_distribution<int64_t>(0, 5)(rng);
  k.pixels.resize(k.h * k.stride);
  for (auto& p : k.pixels) p = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<double> u(0, 1);
  const double bw = std::max(0.5, u(rng) * k.w), bh = std::max(0.5, u(rng) * k.h);
  k.box = {u(rng) * (k.w - bw), u(rng) * (k.h - bh), bw, bh};
  if (rng() % 4 == 0) k.box = {0, 0, double(k.w), double(k.h)};
  k.flip = rng() % 2;
  return k;
}

const float kMean[3] = {0.485f, 0.456f, 0.406f};
const float kStd[3] = {0.229f, 0.224f, 0.225f};

void check_random(const std::string& level) {
  geocell::set_image_simd_level(level);
  std::mt19937_64 rng(level.size());
  double worst = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const Case k = random_case(rng);
    const int oh = 1 + int(rng() % 40), ow = trial % 2 ? 8 * (1 + int(rng() % 5)) : 1 + int(rng() % 40);
    geocell::ImageU8 im{k.pixels.data(), k.h, k.w, k.stride};
    const uint8_t flip = k.flip;
    // Outputs at 64-byte boundaries (the vector path streams its stores) and off them.
    std::vector<float> storage(3 * oh * ow + 32, -99.0f);
    const size_t skew = (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64 / sizeof(float);
    float* out = storage.data() + skew + (trial % 3 == 0 ? 1 : 0);
    geocell::resample_normalize(&im, &k.box, &flip, 1, oh, ow, kMean, kStd, out, 1);
    const std::vector<float> got(out, out + 3 * oh * ow);
    const auto want = reference(k, oh, ow, kMean, kStd);
    for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, double(std::fabs(got[i] - want[i])));
  }
  geocell::set_image_simd_level(geocell::image_simd_levels().front());
  if (!(worst < 2e-5)) std::fprintf(stderr, "worst difference %g (%s)\n", worst, level.c_str());
  CHECK(worst < 2e-5);
}

}  // namespace

TEST(image_resample_matches_reference) {
  // Every path this CPU has (a CPU without AVX-512 or AVX2 tests fewer).
  for (const auto& level : geocell::image_simd_levels()) check_random(level);
}

TEST(image_resample_identity_and_mirror) {
  // A whole-image box at the same size reads each pixel with weight 1.
  std::mt19937_64 rng(3);
  const int64_t h = 13, w = 21;
  std::vector<uint8_t> px(h * w * 3);
  for (auto& p : px) p = static_cast<uint8_t>(rng());
  const float zero[3] = {0, 0, 0}, one[3] = {1, 1, 1};
  for (const auto& level : geocell::image_simd_levels()) {
    geocell::set_image_simd_level(level);
    geocell::ImageU8 im{px.data(), h, w, w * 3};
    geocell::PixelBox box{0, 0, double(w), double(h)};
    const uint8_t flips[2] = {0, 1};
    geocell::ImageU8 ims[2] = {im, im};
    geocell::PixelBox boxes[2] = {box, box};
    std::vector<float> out(2 * 3 * h * w);
    geocell::resample_normalize(ims, boxes, flips, 2, h, w, zero, one, out.data(), 2);
    int bad = 0;
    for (int c = 0; c < 3; ++c)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          const float v = px[(y * w + x) * 3 + c] / 255.0f;
          // Equal up to the float rounding of v * (1 / 255).
          bad += std::fabs(out[(c * h + y) * w + x] - v) > 1e-6f;
          bad += std::fabs(out[3 * h * w + (c * h + y) * w + (w - 1 - x)] - v) > 1e-6f;
        }
    CHECK_EQ(bad, 0);
  }
  geocell::set_image_simd_level(geocell::image_simd_levels().front());
}

TEST(image_resample_threads_agree) {
  std::mt19937_64 rng(5);
  std::vector<Case> cases;
  for (int i = 0; i < 37; ++i) cases.push_back(random_case(rng));
  std::vector<geocell::ImageU8> ims;
  std::vector<geocell::PixelBox> boxes;
  std::vector<uint8_t> flips;
  for (const auto& k : cases) {
    ims.push_back({k.pixels.data(), k.h, k.w, k.stride});
    boxes.push_back(k.box);
    flips.push_back(k.flip);
  }
  const int oh = 24, ow = 37;
  std::vector<float> a(cases.size() * 3 * oh * ow), b(a.size());
  geocell::resample_normalize(ims.data(), boxes.data(), flips.data(), cases.size(), oh, ow, kMean, kStd, a.data(), 1);
  geocell::resample_normalize(ims.data(), boxes.data(), flips.data(), cases.size(), oh, ow, kMean, kStd, b.data(), 3);
  CHECK(a == b);
}

TEST(image_resample_rejects_bad_boxes) {
  std::vector<uint8_t> px(10 * 10 * 3, 7);
  std::vector<float> out(3 * 4 * 4);
  auto rejects = [&](const geocell::ImageU8& im, const geocell::PixelBox& box) {
    try {
      geocell::resample_normalize(&im, &box, nullptr, 1, 4, 4, kMean, kStd, out.data(), 1);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  const geocell::ImageU8 im{px.data(), 10, 10, 30};
  const geocell::PixelBox bad[] = {{-1, 0, 5, 5}, {0, 0, 11, 5}, {0, 0, 0, 5}, {6, 6, 5, 5}, {0, 0, NAN, 5}};
  for (const auto& b : bad) CHECK(rejects(im, b));
  CHECK(!rejects(im, {0, 0, 10, 10}));
  const geocell::ImageU8 narrow{px.data(), 10, 10, 20};  // row stride shorter than a row
  CHECK(rejects(narrow, {0, 0, 5, 5}));
}
