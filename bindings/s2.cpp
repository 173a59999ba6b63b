#include <pybind11/pybind11.h>
void register_s2(pybind11::module_&) {}
