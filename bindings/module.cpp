// The extension module geocell._core: registration only. Each bindings/*.cpp
// translates one part of the core (numpy <-> pointers, errors, the GIL).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_s2(py::module_& m);
void register_partition(py::module_& m);
void register_image(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "geocell's compiled core (use the geocell package, not this module)";
  register_s2(m);
  register_partition(m);
  register_image(m);
}
