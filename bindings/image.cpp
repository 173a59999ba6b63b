// geocell._core image resampling: a list of HxWx3 uint8 arrays (any row
// stride; pixels and channels packed) and per-image boxes in, the caller's
// float32 (n, 3, H, W) array filled. Shapes, dtypes and strides are checked
// here (errors name the image); the core checks the boxes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "geocell/image.h"

namespace py = pybind11;

namespace {

void resample_normalize(const std::vector<py::array>& images, const py::array_t<double, py::array::c_style>& boxes,
                        const std::optional<py::array_t<uint8_t, py::array::c_style>>& flip, py::array out,
                        const std::array<float, 3>& mean, const std::array<float, 3>& stdev, int threads) {
  const size_t n = images.size();
  if (boxes.ndim() != 2 || static_cast<size_t>(boxes.shape(0)) != n || boxes.shape(1) != 4)
    throw std::invalid_argument("boxes must have shape (n, 4)");
  if (flip && static_cast<size_t>(flip->size()) != n) throw std::invalid_argument("flip must have n entries");
  if (!out.dtype().equal(py::dtype::of<float>()) || !(out.flags() & py::array::c_style) || !out.writeable() ||
      out.ndim() != 4 || static_cast<size_t>(out.shape(0)) != n || out.shape(1) != 3)
    throw std::invalid_argument("out must be a writeable C-contiguous float32 array of shape (n, 3, H, W)");
  std::vector<geocell::ImageU8> views(n);
  for (size_t i = 0; i < n; ++i) {
    const py::array& a = images[i];
    if (!a.dtype().equal(py::dtype::of<uint8_t>()) || a.ndim() != 3 || a.shape(2) != 3 || a.strides(2) != 1 ||
        a.strides(1) != 3 || a.strides(0) < 3 * a.shape(1))
      throw std::invalid_argument("image " + std::to_string(i) +
                                  ": expected an HxWx3 uint8 array with packed pixels (HWC, RGB)");
    views[i] = {static_cast<const uint8_t*>(a.data()), a.shape(0), a.shape(1), a.strides(0)};
  }
  std::vector<geocell::PixelBox> bx(n);
  const double* b = boxes.data();
  for (size_t i = 0; i < n; ++i) bx[i] = {b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]};
  const int out_h = static_cast<int>(out.shape(2)), out_w = static_cast<int>(out.shape(3));
  float* o = static_cast<float*>(out.mutable_data());
  const uint8_t* f = flip ? flip->data() : nullptr;
  py::gil_scoped_release nogil;
  geocell::resample_normalize(views.data(), bx.data(), f, n, out_h, out_w, mean.data(), stdev.data(), o, threads);
}

}  // namespace

void register_image(py::module_& m) {
  m.def("resample_normalize", &resample_normalize, py::arg("images"), py::arg("boxes"), py::arg("flip"),
        py::arg("out"), py::arg("mean"), py::arg("std"), py::arg("threads") = 0,
        "Resizes boxes (left, top, width, height) of HxWx3 uint8 images into out (n, 3, H, W) float32 with "
        "antialiased bilinear filtering, mirrors where flip, and normalizes (v / 255 - mean) / std.");
  m.def("image_simd_levels", &geocell::image_simd_levels,
        "The vector paths of resample_normalize this CPU runs, best first.");
  m.def("image_simd_level", &geocell::image_simd_level, "The vector path resample_normalize takes.");
  m.def("set_image_simd_level", &geocell::set_image_simd_level, py::arg("level"),
        "Forces a path of resample_normalize (one of image_simd_levels(); ValueError otherwise).");
}
