// Image resampling for training input: a box of each decoded RGB image,
// resized with antialiased bilinear filtering (the filter of Pillow's
// Image.resize and torchvision's antialias=True), optionally mirrored, scaled
// to (v / 255 - mean) / std and written as planar float (CHW).
//
// The arithmetic is float, with no rounding to 8 bits between the two passes,
// so it equals torchvision's resize of a float image up to float rounding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace geocell {

// Interleaved RGB bytes; rows may be padded (row_stride >= 3 * width).
struct ImageU8 {
  const uint8_t* data;
  int64_t height;
  int64_t width;
  int64_t row_stride;
};

// A region in source pixel units (the top-left corner of the image is 0, 0);
// filter taps outside the image are left out and the rest renormalized, as
// Pillow does, so a box over the whole image reads no pixel twice.
struct PixelBox {
  double left;
  double top;
  double width;
  double height;
};

// For each image i: out + i * 3 * out_h * out_w receives the box resized to
// out_h x out_w, mirrored left-right where flip[i] != 0 (flip may be null).
// Boxes must have positive size and overlap their image; threads: 0 = all
// cores. Throws std::invalid_argument on bad sizes or boxes.
void resample_normalize(const ImageU8* images, const PixelBox* boxes, const uint8_t* flip,
                        size_t n, int out_h, int out_w, const float mean[3], const float stdev[3],
                        float* out, int threads);

// The vector paths of resample_normalize this CPU runs, best first ("avx2",
// "scalar"); the one in use (the best, unless set); and a way to force
// one (tests compare them). Results agree to float rounding.
std::vector<std::string> image_simd_levels();
std::string image_simd_level();
void set_image_simd_level(const std::string& level);  // std::invalid_argument if unknown here

}  // namespace geocell
