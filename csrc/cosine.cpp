// distil::cosine_rows and distil::cosine_rows_backward: schemas and CPU kernels (math in
// kernels/cosine.py, the CUDA twin).  One pass per row over x and y with fp32 accumulation, rows
// spread over threads with at::parallel_for; rows, masks and per-row gradients are read in place
// through their strides (the helpers of rows.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "rows.h"

namespace {

using distil::cpu::RowOffsets;
using distil::cpu::RowValues;
using distil::cpu::row_values;

constexpr const char* kOp = "cosine_rows";
constexpr float kEps = 1e-12f;  // nn.CosineEmbeddingLoss adds this to each squared norm

struct Terms {
  float cos, kx, ky;  // d(1 - cos)/dx = kx * x - ky * y
};

template <typename TX, typename TY>
Terms cosine_terms(const TX* x, const TY* y, int64_t H) {
  float sxy = 0.f, sxx = 0.f, syy = 0.f;
#pragma omp simd reduction(+ : sxy, sxx, syy)
  for (int64_t j = 0; j < H; ++j) {
    float a = static_cast<float>(x[j]), b = static_cast<float>(y[j]);
    sxy += a * b;
    sxx += a * a;
    syy += b * b;
  }
  float a = sxx + kEps;
  float d = std::sqrt(a * (syy + kEps));
  float cos = sxy / d;
  return {cos, cos / a, 1.f / d};
}

template <typename TX, typename TY>
void write_grad(TX* dx, const TX* x, const TY* y, int64_t H, float kx, float ky) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    dx[j] = static_cast<TX>(kx * static_cast<float>(x[j]) - ky * static_cast<float>(y[j]));
  }
}

// What both ops read, checked: the rows of x and y (read in place through their strides), the mask
// and coef[0].
struct Problem {
  const at::Tensor& student;
  const at::Tensor& teacher;
  int64_t n, H;
  RowOffsets x_offset, y_offset;
  std::optional<RowValues<bool>> mask;
  float coef;

  Problem(const at::Tensor& student_, const at::Tensor& teacher_, const std::optional<at::Tensor>& mask_,
          const at::Tensor& coef_)
      : student(student_), teacher(teacher_) {
    distil::cpu::check_float_rows(kOp, "student", student);
    distil::cpu::check_float_rows(kOp, "teacher", teacher);
    TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), kOp, ": teacher has shape ", teacher.sizes(),
                      " but student has shape ", student.sizes());
    const int64_t row_dims = student.dim() - 1;
    H = student.size(row_dims);
    n = c10::multiply_integers(student.sizes().slice(0, row_dims));
    x_offset = distil::cpu::row_offsets(student, row_dims);
    y_offset = distil::cpu::row_offsets(teacher, row_dims);
    if (mask_) {
      distil::cpu::check_rows_tensor(kOp, "mask", *mask_, student, at::kBool);
      mask = row_values<bool>(*mask_, row_dims);
    }
    distil::cpu::check_cpu(kOp, "coef", coef_);
    TORCH_CHECK(coef_.scalar_type() == at::kFloat && coef_.numel() == 1, kOp, ": coef must be one float32");
    coef = coef_.item<float>();
  }

  bool selected(int64_t r) const { return !mask || (*mask)[r]; }

  // Calls fn(r, x_row, y_row) for every row, rows spread over threads, the row pointers typed by the
  // student's and the teacher's dtypes.
  template <typename Fn>
  void for_each_row(Fn&& fn) const {
    distil::cpu::dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto tx, auto ty) {
      const auto* x = student.const_data_ptr<decltype(tx)>();
      const auto* y = teacher.const_data_ptr<decltype(ty)>();
      at::parallel_for(0, n, distil::cpu::grain_rows(H), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) fn(r, x + x_offset(r), y + y_offset(r));
      });
    });
  }
};

template <typename P>
using Element = std::remove_const_t<std::remove_pointer_t<P>>;

std::tuple<at::Tensor, at::Tensor> cosine_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& mask, const at::Tensor& coef,
                                                   bool compute_grad) {
  const Problem pb(student, teacher, mask, coef);
  at::Tensor loss = at::empty(student.sizes().slice(0, student.dim() - 1), student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? distil::cpu::empty_written_once(student.sizes(), student.options())
                                 : at::empty({0}, student.options());
  float* l = loss.data_ptr<float>();
  const int64_t H = pb.H;
  pb.for_each_row([&](int64_t r, const auto* xr, const auto* yr) {
    using TX = Element<decltype(xr)>;
    TX* dx = compute_grad ? grad.mutable_data_ptr<TX>() + r * H : nullptr;
    if (!pb.selected(r)) {
      l[r] = 0.f;
      if (dx != nullptr) std::fill(dx, dx + H, TX(0.f));
      return;
    }
    Terms t = cosine_terms(xr, yr, H);
    l[r] = 1.f - t.cos;
    if (dx != nullptr) write_grad(dx, xr, yr, H, pb.coef * t.kx, pb.coef * t.ky);
  });
  return {loss, grad};
}

void cosine_rows_backward_cpu(at::Tensor& grad, const at::Tensor& grad_rows, const at::Tensor& student,
                              const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                              const at::Tensor& coef) {
  const Problem pb(student, teacher, mask, coef);
  distil::cpu::check_cpu("cosine_rows_backward", "grad", grad);
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == student.scalar_type(),
              "cosine_rows_backward: grad must be the forward's gradient buffer");
  distil::cpu::check_rows_tensor("cosine_rows_backward", "grad_rows", grad_rows, student, at::kFloat);
  const RowValues<float> g = row_values<float>(grad_rows, student.dim() - 1);
  const float c = pb.coef;
  const int64_t H = pb.H;
  pb.for_each_row([&](int64_t r, const auto* xr, const auto* yr) {
    using TX = Element<decltype(xr)>;
    if (!pb.selected(r)) return;  // the forward wrote zeros
    TX* d = grad.mutable_data_ptr<TX>() + r * H;
    // d holds c * d(1 - cos)/dx: leave it when g is exactly c, else rescale it where that keeps the
    // dtype's precision, else recompute it (also where c is 0: nothing to rescale).
    const float ratio = c != 0.f ? g[r] / c : 0.f;
    if (ratio == 1.f) return;
    if (c != 0.f && distil::cpu::rescale_keeps_precision(ratio, !std::is_same_v<TX, float>)) {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) d[j] = static_cast<TX>(static_cast<float>(d[j]) * ratio);
    } else {
      Terms t = cosine_terms(xr, yr, H);
      write_grad(d, xr, yr, H, g[r] * t.kx, g[r] * t.ky);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distil, m) {
  // Cosine alignment per row of [N, H] or [B, S, H] hidden states, with nn.CosineEmbeddingLoss
  // (target +1) semantics: loss_rows = 1 - cos where mask (every row when absent), 0 elsewhere;
  // grad = coef[0] * d loss_rows / d student, written only when compute_grad (else empty).
  m.def("cosine_rows(Tensor student, Tensor teacher, Tensor? mask, Tensor coef, bool compute_grad) -> (Tensor, Tensor)");
  // Turns the forward's grad (made for coef) into the gradient for grad_rows, in place.
  m.def(
      "cosine_rows_backward(Tensor(a!) grad, Tensor grad_rows, Tensor student, Tensor teacher, Tensor? mask, "
      "Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(distil, CPU, m) {
  m.impl("cosine_rows", &cosine_rows_cpu);
  m.impl("cosine_rows_backward", &cosine_rows_backward_cpu);
}
