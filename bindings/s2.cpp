// Bindings of the S2 core: contiguous numpy arrays in, numpy arrays out, the
// GIL released around every kernel. Validation messages and dtype coercion
// live in geocell/cells.py; these functions expect what it passes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <stdexcept>
#include <vector>

#include "geocell/s2.h"

namespace py = pybind11;

namespace {

using F64 = py::array_t<double, py::array::c_style>;
using U64 = py::array_t<uint64_t, py::array::c_style>;

size_t same_size(std::initializer_list<size_t> sizes) {
  const size_t n = *sizes.begin();
  for (size_t s : sizes) {
    if (s != n) throw std::invalid_argument("arrays of different lengths");
  }
  return n;
}

void check_level(int level) {
  if (level < 0 || level > geocell::kMaxLevel) throw std::invalid_argument("level outside 0..30");
}

}  // namespace

void register_s2(py::module_& m) {
  m.def(
      "find_invalid_latlng",
      [](const F64& lat, const F64& lng) {
        const size_t n = same_size({static_cast<size_t>(lat.size()), static_cast<size_t>(lng.size())});
        py::gil_scoped_release nogil;
        return geocell::find_invalid_latlng(lat.data(), lng.data(), n);
      },
      py::arg("lat"), py::arg("lng"));
  m.def(
      "find_invalid_cell",
      [](const U64& cells) {
        py::gil_scoped_release nogil;
        return geocell::find_invalid_cell(cells.data(), static_cast<size_t>(cells.size()));
      },
      py::arg("cells"));
  m.def(
      "latlng_to_cell",
      [](const F64& lat, const F64& lng, int level, int threads, std::optional<py::array> out_arg) {
        // Returns (ids, first invalid index or -1); ids are garbage past -1.
        // out: a C-contiguous, writeable uint64 array of n ids to fill (and
        // return) instead of a fresh one; cells.py checks it too, with fuller
        // messages.
        const size_t n = same_size({static_cast<size_t>(lat.size()), static_cast<size_t>(lng.size())});
        check_level(level);
        py::array out;
        if (out_arg) {
          out = *out_arg;
          if (!out.dtype().equal(py::dtype::of<uint64_t>()) || !(out.flags() & py::array::c_style) ||
              !out.writeable() || static_cast<size_t>(out.size()) != n) {
            throw std::invalid_argument("out must be a writeable C-contiguous uint64 array of the points' size");
          }
        } else {
          out = U64(static_cast<py::ssize_t>(n));
        }
        uint64_t* o = static_cast<uint64_t*>(out.mutable_data());
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = geocell::latlng_to_cell_batch_checked(lat.data(), lng.data(), n, level, o, threads);
        }
        return py::make_tuple(out, bad);
      },
      py::arg("lat"), py::arg("lng"), py::arg("level"), py::arg("threads") = 0, py::arg("out") = py::none());
  m.def(
      "cell_to_latlng",
      [](const U64& cells, int threads) {
        const auto n = cells.size();
        F64 lat(n), lng(n);
        double* la = lat.mutable_data();
        double* ln = lng.mutable_data();
        {
          py::gil_scoped_release nogil;
          geocell::cell_to_latlng_batch(cells.data(), static_cast<size_t>(n), la, ln, threads);
        }
        return py::make_tuple(lat, lng);
      },
      py::arg("cells"), py::arg("threads") = 0);
  m.def(
      "cell_to_boundary",
      [](const U64& cells, int threads) {
        const auto n = cells.size();
        F64 out({n, py::ssize_t{4}, py::ssize_t{2}});
        double* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          geocell::cell_to_boundary_batch(cells.data(), static_cast<size_t>(n), o, threads);
        }
        return out;
      },
      py::arg("cells"), py::arg("threads") = 0);
  m.def(
      "great_circle_km",
      [](const F64& lat1, const F64& lng1, const F64& lat2, const F64& lng2, int threads) {
        const size_t n = same_size({static_cast<size_t>(lat1.size()), static_cast<size_t>(lng1.size()),
                                    static_cast<size_t>(lat2.size()), static_cast<size_t>(lng2.size())});
        F64 out(static_cast<py::ssize_t>(n));
        double* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          geocell::great_circle_km_batch(lat1.data(), lng1.data(), lat2.data(), lng2.data(), n, o,
                                         threads);
        }
        return out;
      },
      py::arg("lat1"), py::arg("lng1"), py::arg("lat2"), py::arg("lng2"), py::arg("threads") = 0);
  m.def(
      "cell_to_token",
      [](const U64& cells) {
        // Fixed-width bytes ("S16"); cells.py turns them into str.
        const auto n = cells.size();
        py::array out(py::dtype("S16"), std::vector<py::ssize_t>{n}, std::vector<py::ssize_t>{});
        char* o = static_cast<char*>(out.mutable_data());
        {
          py::gil_scoped_release nogil;
          geocell::cell_to_token_batch(cells.data(), static_cast<size_t>(n), o, 16);
        }
        return out;
      },
      py::arg("cells"));
  m.def(
      "token_to_cell",
      [](const py::array& tokens) {
        // A C-contiguous "S<width>" array; returns (ids, first bad index or -1).
        if (tokens.dtype().kind() != 'S' || !(tokens.flags() & py::array::c_style)) {
          throw std::invalid_argument("tokens must be a contiguous bytes (S) array");
        }
        const auto n = tokens.size();
        const size_t width = static_cast<size_t>(tokens.itemsize());
        U64 out(n);
        uint64_t* o = out.mutable_data();
        int64_t bad;
        {
          py::gil_scoped_release nogil;
          bad = width == 0 ? (n > 0 ? 0 : -1)
                           : geocell::token_to_cell_batch(static_cast<const char*>(tokens.data()),
                                                          width, static_cast<size_t>(n), o);
        }
        return py::make_tuple(out, bad);
      },
      py::arg("tokens"));
  m.def("simd_available", &geocell::simd_available,
        "Whether this CPU runs a vector path (AVX2/FMA or AVX-512) of latlng_to_cell.");
  m.def("set_simd_enabled", &geocell::set_simd_enabled, py::arg("enabled"),
        "Switches between the best vector path and the scalar one (results are identical; for tests "
        "and benchmarks).");
  m.def("simd_levels", &geocell::simd_levels,
        "The paths of latlng_to_cell this CPU runs, best first: from 'avx512', 'avx2', 'scalar'.");
  m.def("simd_level", &geocell::simd_level, "The path latlng_to_cell takes now.");
  m.def("set_simd_level", &geocell::set_simd_level, py::arg("level"),
        "Forces a path (one of simd_levels(); ValueError otherwise). Results are identical.");
  m.def("resolve_threads", &geocell::resolve_threads, py::arg("threads"));
}
