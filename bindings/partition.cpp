// geocell._core partitioner functions: numpy <-> pointers and the GIL only.
// Argument checks and error messages live in python/geocell/partition.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "geocell/partition.h"

namespace py = pybind11;

namespace {

template <class T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

py::tuple partition_latlng(carray<double> lat, carray<double> lng,
                           const std::vector<std::tuple<int64_t, int64_t, int, int>>& params,
                           bool drop_invalid, int threads) {
  std::vector<geocell::PartitionParams> ps;
  for (const auto& [tau_min, tau_max, level_min, level_max] : params)
    ps.push_back({tau_min, tau_max, level_min, level_max});
  const size_t n = static_cast<size_t>(std::min(lat.size(), lng.size()));
  std::vector<geocell::PartitionCells> parts;
  int64_t first_invalid = -1, n_dropped = 0;
  {
    py::gil_scoped_release release;
    first_invalid = geocell::partition_latlng(lat.data(), lng.data(), n, ps.data(), ps.size(),
                                              drop_invalid, threads, &parts, &n_dropped);
  }
  py::list out;
  for (const auto& p : parts) {
    auto centroids = to_numpy(p.centroids);
    centroids.resize({static_cast<py::ssize_t>(p.cells.size()), py::ssize_t{2}});
    out.append(py::make_tuple(to_numpy(p.cells), to_numpy(p.counts), to_numpy(p.levels),
                              centroids));
  }
  return py::make_tuple(first_invalid, n_dropped, out);
}

py::array_t<int64_t> assign_latlng(carray<uint64_t> cells, carray<double> lat,
                                   carray<double> lng, int threads) {
  const size_t n = static_cast<size_t>(std::min(lat.size(), lng.size()));
  py::array_t<int64_t> out(static_cast<py::ssize_t>(n));
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    geocell::assign_latlng(cells.data(), cells.size(), lat.data(), lng.data(), n, o, threads);
  }
  return out;
}

py::array_t<int64_t> assign_cells(carray<uint64_t> cells, carray<uint64_t> queries,
                                  int threads) {
  py::array_t<int64_t> out(queries.size());
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    geocell::assign_cells(cells.data(), cells.size(), queries.data(), queries.size(), o,
                          threads);
  }
  return out;
}

}  // namespace

void register_partition(py::module_& m) {
  m.def("partition_latlng", &partition_latlng, py::arg("lat"), py::arg("lng"), py::arg("params"),
        py::arg("drop_invalid"), py::arg("threads"),
        "(first_invalid, n_dropped, [(cells, counts, levels, centroids), ...]) for "
        "params [(tau_min, tau_max, level_min, level_max), ...]; nothing computed when "
        "first_invalid >= 0");
  m.def("partition_assign_latlng", &assign_latlng, py::arg("cells"), py::arg("lat"),
        py::arg("lng"), py::arg("threads"),
        "index of the sorted disjoint cell containing each point, -1 if none or invalid");
  m.def("partition_assign_cells", &assign_cells, py::arg("cells"), py::arg("queries"),
        py::arg("threads"),
        "index of the sorted disjoint cell containing each query cell, -1 if none");
}
