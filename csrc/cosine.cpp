// distil::cosine_rows and distil::cosine_rows_backward: schemas and CPU kernels (math in
// kernels/cosine.py, the CUDA twin).  One pass per row over x and y
// with fp32 accumulation, rows spread over threads with at::parallel_for; rows of a
// [B, S, H] input are read in place through its strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "rows.h"

namespace {

constexpr float kEps = 1e-12f;  // nn.CosineEmbeddingLoss adds this to each squared norm
constexpr int64_t kGrainElements = 32768;

int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(H, 1)); }

// The rows of an [N, H] or [B, S, H] tensor: count, width and element offsets.
struct Rows {
  int64_t n, H;
  distil::cpu::RowOffsets offset;
};

Rows rows_of(const at::Tensor& t) {
  const int64_t row_dims = t.dim() - 1;
  int64_t n = 1;
  for (int64_t d = 0; d < row_dims; ++d) n *= t.size(d);
  return {n, t.size(row_dims), distil::cpu::row_offsets(t, row_dims)};
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
                  const at::Tensor& coef) {
  TORCH_CHECK(student.dim() == 2 || student.dim() == 3, "cosine_rows: student must be 2-D or 3-D, got ",
              student.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "cosine_rows: teacher shape ", teacher.sizes(),
              " differs from student shape ", student.sizes());
  for (const auto& t : {student, teacher}) {
    auto dt = t.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                     "cosine_rows: hidden states must be float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1,
                      "cosine_rows: hidden states must have a unit stride in their last dim, got strides ",
                      t.strides());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "cosine_rows: mask must be bool");
    TORCH_CHECK(mask->sizes() == student.sizes().slice(0, student.dim() - 1), "cosine_rows: mask shape ",
                mask->sizes(), " does not match the rows of ", student.sizes());
  }
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() == 1, "cosine_rows: coef must be one float32");
}

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

// What both ops read, checked: the rows of x and y, the mask (contiguous, or undefined) and coef[0].
struct Problem {
  Rows x, y;
  at::Tensor mask;
  float coef;
  const bool* selected() const { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }
};

Problem problem(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask,
                const at::Tensor& coef) {
  check_inputs(student, teacher, mask, coef);
  return {rows_of(student), rows_of(teacher), mask.has_value() ? mask->contiguous() : at::Tensor(),
          coef.item<float>()};
}

std::tuple<at::Tensor, at::Tensor> cosine_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const c10::optional<at::Tensor>& mask_in, const at::Tensor& coef,
                                                   bool compute_grad) {
  const Problem pb = problem(student, teacher, mask_in, coef);
  const Rows &rx = pb.x, &ry = pb.y;
  at::Tensor loss = at::empty(student.sizes().slice(0, student.dim() - 1), student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? distil::cpu::empty_written_once(student.sizes(), student.options())
                                 : at::empty({0}, student.options());
  const float c = pb.coef;
  const bool* m = pb.selected();
  float* l = loss.data_ptr<float>();
  const int64_t H = rx.H;
  distil::cpu::dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto tx, auto ty) {
    using TX = decltype(tx);
    using TY = decltype(ty);
    const TX* x = student.const_data_ptr<TX>();
    const TY* y = teacher.const_data_ptr<TY>();
    TX* dx = compute_grad ? grad.mutable_data_ptr<TX>() : nullptr;
    at::parallel_for(0, rx.n, grain_rows(H), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        if (m != nullptr && !m[r]) {
          l[r] = 0.f;
          if (dx != nullptr) std::fill(dx + r * H, dx + (r + 1) * H, TX(0.f));
          continue;
        }
        const TX* xr = x + rx.offset(r);
        const TY* yr = y + ry.offset(r);
        Terms t = cosine_terms(xr, yr, H);
        l[r] = 1.f - t.cos;
        if (dx != nullptr) write_grad(dx + r * H, xr, yr, H, c * t.kx, c * t.ky);
      }
    });
  });
  return {loss, grad};
}

void cosine_rows_backward_cpu(at::Tensor& grad, const at::Tensor& grad_rows_in, const at::Tensor& student,
                              const at::Tensor& teacher, const c10::optional<at::Tensor>& mask_in,
                              const at::Tensor& coef) {
  const Problem pb = problem(student, teacher, mask_in, coef);
  const Rows &rx = pb.x, &ry = pb.y;
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == student.scalar_type(),
              "cosine_rows_backward: grad must be the forward's gradient buffer");
  at::Tensor grad_rows = grad_rows_in.to(at::kFloat).contiguous();
  TORCH_CHECK(grad_rows.numel() == rx.n, "cosine_rows_backward: grad_rows must have one value per row");
  const float c = pb.coef;
  const bool* m = pb.selected();
  const float* g = grad_rows.const_data_ptr<float>();
  const int64_t H = rx.H;
  distil::cpu::dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto tx, auto ty) {
    using TX = decltype(tx);
    using TY = decltype(ty);
    const TX* x = student.const_data_ptr<TX>();
    const TY* y = teacher.const_data_ptr<TY>();
    TX* dx = grad.mutable_data_ptr<TX>();
    at::parallel_for(0, rx.n, grain_rows(H), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        if (m != nullptr && !m[r]) continue;  // the forward wrote zeros
        TX* d = dx + r * H;
        // dx holds c * d(1 - cos)/dx: leave it when g is exactly c, else rescale it where that keeps
        // the dtype's precision, else recompute it (also where c is 0: nothing to rescale).
        const float ratio = c != 0.f ? g[r] / c : 0.f;
        if (ratio == 1.f) continue;
        if (c != 0.f && distil::cpu::rescale_keeps_precision(ratio, !std::is_same_v<TX, float>)) {
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) d[j] = static_cast<TX>(static_cast<float>(d[j]) * ratio);
        } else {
          const TX* xr = x + rx.offset(r);
          const TY* yr = y + ry.offset(r);
          Terms t = cosine_terms(xr, yr, H);
          write_grad(d, xr, yr, H, g[r] * t.kx, g[r] * t.ky);
        }
      }
    });
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
