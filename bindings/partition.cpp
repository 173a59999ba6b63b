#include <pybind11/pybind11.h>
void register_partition(pybind11::module_&) {}
