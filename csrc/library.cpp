// The distil operator library: the Python module distil._C and the namespace `distil`.
// Each op declares its own schema next to its CPU kernel (TORCH_LIBRARY_FRAGMENT in
// csrc/<op>.cpp); the CUDA kernels are csrc/cuda/*.cu (C++) or kernels/<op>.py (Triton,
// registered from distil/_ops/<op>.py, which also registers fake impls and autograd).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing distil._C (an ordinary Python extension module) loads this library and so runs
// every registration in it.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(distil, m) {}
