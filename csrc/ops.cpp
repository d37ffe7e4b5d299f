// The one schema block of the distil operator library.  Implementations live
// beside it: CPU kernels in csrc/*_cpu.cpp, CUDA kernels in csrc/cuda/*.cu, and
// the Triton kernels (kernels/) are registered for CUDA from Python
// (distil/_registry.py), which also registers fake impls and autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing distil._C (an ordinary Python extension module) loads this library
// and so runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(distil, m) {
  // Temperature KL + cross-entropy per row of [N, V] or [B, S, V] logits.
  // Returns (kl_rows, ce_rows, grad): kl_rows = T^2 * KL(softmax(t/T) || softmax(s/T))
  // where kl_mask (or every row when absent); ce_rows = cross_entropy(s, label) where
  // label != ignore_index; grad = coef[0] * d kl_rows/ds + coef[1] * d ce_rows/ds, in
  // the student's dtype, written only when compute_grad (else an empty tensor).
  m.def(
      "kl_ce_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, "
      "float temperature, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Turns the forward's grad (made for coef) into the gradient for the incoming
  // per-row gradients, in place: a per-row scale when they are proportional to
  // coef (nothing at all when the factor is 1), else a recomputation.
  m.def(
      "kl_ce_rows_backward(Tensor(a!) grad, Tensor grad_kl_rows, Tensor grad_ce_rows, Tensor student, "
      "Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, float temperature, int ignore_index) -> ()");

  // Cosine alignment per row of [N, H] or [B, S, H] hidden states, with
  // nn.CosineEmbeddingLoss (target +1) semantics: loss_rows = 1 - cos where mask
  // (every row when absent), 0 elsewhere; grad = coef[0] * d loss_rows/d student.
  m.def("cosine_rows(Tensor student, Tensor teacher, Tensor? mask, Tensor coef, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "cosine_rows_backward(Tensor(a!) grad, Tensor grad_rows, Tensor student, Tensor teacher, Tensor? mask, "
      "Tensor coef) -> ()");

  // Masked-token row gather / scatter (see distil/ops.py).
  m.def("masked_gather(Tensor x, Tensor mask, SymInt? capacity) -> (Tensor rows, Tensor index, Tensor count)");
  m.def("masked_scatter_rows(Tensor rows, Tensor index, SymInt[] shape) -> Tensor");
}
