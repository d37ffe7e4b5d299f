// distil::kl_ce_rows and distil::kl_ce_rows_backward: schemas and CPU kernels (the CUDA twin
// is kernels/kl_ce.py, whose docstring states the contract).  Per row this is
//   kl_rows = nn.KLDivLoss(reduction="none")(log_softmax(s/T), softmax(t/T)).sum(-1) * T**2
//   ce_rows = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
// (distiller.py's loss_ce and loss_mlm before their batchmean / mean), with the gradient of
// coef[0] * kl_rows + coef[1] * ce_rows written in the forward.
// kl_rows may hold another divergence instead of the forward KL (divergence.h): those take a
// fourth pass (their loss terms and c = sum_j q_j a_j, over the stored exponentials, before the gradient).
// One thread handles whole rows (at::parallel_for);
// a row of V = 30522 logits is 120 KB in fp32, so the three passes below (maxima; the
// exp-sums, storing the exponentials; the gradient) run out of L2 and DRAM sees each
// input once and the gradient once.  The row loops are plain loops that vectorise in every
// target clone (rows.h).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "divergence.h"
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace distil::cpu {
namespace {

using at::Tensor;

constexpr const char* kOp = "kl_ce_rows";

// e^y - 1 for |y| <= 1/4: Taylor to y^6 (truncation < 5e-8 relative), where e^y - 1 from exp_nonpos
// would cancel.
DISTIL_INLINE float expm1_small(float y) {
  return y * (1.0f + y * (0.5f + y * (1.0f / 6.0f + y * (1.0f / 24.0f + y * (1.0f / 120.0f + y * (1.0f / 720.0f))))));
}


struct Sums {
  float zs = 0.f;  // sum_j e^{(s_j - ms)/T}
  float zt = 0.f;  // sum_j e^{(t_j - mt)/T}
  float d = 0.f;   // sum_j e^{(t_j - mt)/T} * ((t_j - mt) - (s_j - ms)), 0 where q_j = 0
  float e = 0.f;   // sum_j e^{(s_j - ms)/T} - e^{(t_j - mt)/T}, without cancellation (= zs - zt)
  float z1 = 0.f;  // sum_j e^{s_j - ms}
};

// Pass 2: the exp-sums of one row; with STORE the exponentials are kept in es / et / e1
// for the gradient pass.
template <bool KL, bool CE, bool STORE>
DISTIL_INLINE Sums row_sums(const float* s, const float* t, int64_t V, float inv_t, float ms, float mt,
                            float* es, float* et, float* e1) {
  float zs = 0.f, zt = 0.f, d = 0.f, e = 0.f, z1 = 0.f;
#pragma omp simd reduction(+ : zs, zt, d, e, z1)
  for (int64_t j = 0; j < V; ++j) {
    const float xs = s[j] - ms;
    if constexpr (KL) {
      const float xt = t[j] - mt;
      const float u = exp_nonpos(xs * inv_t);
      const float v = exp_nonpos(xt * inv_t);
      zs += u;
      zt += v;
      // xlogy semantics: a token with q_j = 0 contributes 0 even where s_j = -inf.
      d += v > 0.f ? v * (xt - xs) : 0.f;
      // u - v = v (e^y - 1), y = (xs - xt)/T: from expm1 where u and v are close (large T).
      const float y = (xs - xt) * inv_t;
      e += std::abs(y) <= 0.25f ? v * expm1_small(y) : u - v;
      if constexpr (STORE) {
        es[j] = u;
        et[j] = v;
      }
    }
    if constexpr (CE) {
      const float w = exp_nonpos(xs);
      z1 += w;
      if constexpr (STORE) e1[j] = w;
    }
  }
  return {zs, zt, d, e, z1};
}

// Pass 3: g_j = ws e^{(s_j-ms)/T} - wt e^{(t_j-mt)/T} + w1 e^{s_j-ms} from the stored exponentials.
template <bool KL, bool CE>
DISTIL_INLINE void row_grad(float* g, const float* es, const float* et, const float* e1, int64_t V, float ws,
                            float wt, float w1) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float x = 0.f;
    if constexpr (KL) x = ws * es[j] - wt * et[j];
    if constexpr (CE) x += w1 * e1[j];
    g[j] = x;
  }
}

// Pass 3 of the divergences other than the forward KL (divergence.h): from the stored exponentials
// es, et, the row's sum of loss terms and c = sum_j q_j a_j; a_j replaces et[j] for the gradient.
template <Divergence D>
DISTIL_INLINE void divergence_sums(const float* s, const float* t, int64_t V, float inv_t, float ms, float mt,
                                   float zs, float zt, float param, const float* es, float* et, float& loss,
                                   float& c) {
  const float inv_zs = 1.0f / zs;
  const float inv_zt = 1.0f / zt;
  const float log_ratio = std::log(zs / zt);  // d_j = log p_j - log q_j = delta_j + log(zs / zt), one rounding
  float l_sum = 0.f, c_sum = 0.f;
#pragma omp simd reduction(+ : l_sum, c_sum)
  for (int64_t j = 0; j < V; ++j) {
    const float q = es[j] * inv_zs;
    const float p = et[j] * inv_zt;
    const float d = ((t[j] - mt) - (s[j] - ms)) * inv_t + log_ratio;
    const float a = DivergenceTerm<D>::dq(p, q, d, param);
    l_sum += DivergenceTerm<D>::loss(p, q, d, param);
    c_sum += q * a;
    et[j] = a;
  }
  loss = l_sum;
  c = c_sum;
}

// Pass 4 of those divergences: g_j = ws e^{(s_j-ms)/T} (a_j - c) + w1 e^{s_j-ms}, a_j in et.
template <bool CE>
DISTIL_INLINE void divergence_grad(float* g, const float* es, const float* a, const float* e1, int64_t V, float ws,
                                   float c, float w1) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    float x = ws * es[j] * (a[j] - c);
    if constexpr (CE) x += w1 * e1[j];
    g[j] = x;
  }
}

template <bool KL, bool CE, Divergence D>
DISTIL_INLINE RowLoss kl_ce_row_impl(const float* s, const float* t, int64_t V, float temperature, float param,
                                     const RowJob& job, float ms, float mt, float* g, float* scratch) {
  const float T = temperature;
  const float inv_t = 1.0f / T;
  float* es = scratch;
  float* et = scratch + V;
  float* e1 = scratch + 2 * V;
  const Sums z = g || (KL && D != Divergence::ForwardKL) ? row_sums<KL, CE, true>(s, t, V, inv_t, ms, mt, es, et, e1)
                                                         : row_sums<KL, CE, false>(s, t, V, inv_t, ms, mt, es, et, e1);
  RowLoss out;
  if constexpr (KL && D != Divergence::ForwardKL) {
    float loss, c;
    divergence_sums<D>(s, t, V, inv_t, ms, mt, z.zs, z.zt, param, es, et, loss, c);
    out.kl = std::max(T * T * loss, 0.f);  // never below 0 (rounding); NaN stays
    if constexpr (CE) out.ce = std::log(z.z1) + (ms - s[job.label]);
    if (g) {
      divergence_grad<CE>(g, es, et, e1, V, job.kl_coef * T / z.zs, c, job.ce_coef / z.z1);
      if constexpr (CE) g[job.label] -= job.ce_coef;
    }
    return out;
  }
  // T² KL = T² (sum_j q_j δ_j + log(zs / zt)), δ_j = ((t_j - mt) - (s_j - ms)) / T, with
  // log(zs / zt) = log1p(e / zt): at large T both terms are O(1/T) and cancel to O(1/T²), which
  // log(zs) - log(zt) (each ~log V) would bury in rounding. Never below 0 (a KL is not; NaN stays).
  if constexpr (KL) out.kl = std::max(T * z.d / z.zt + T * T * std::log1p(z.e / z.zt), 0.f);
  // log z + (max - s_y): the difference first, exact at large logits (+1e6), as log_softmax.
  if constexpr (CE) out.ce = std::log(z.z1) + (ms - s[job.label]);
  if (g) {
    // d kl/ds = T (p - q), d ce/ds = P - onehot(y).
    row_grad<KL, CE>(g, es, et, e1, V, job.kl_coef * T / z.zs, job.kl_coef * T / z.zt, job.ce_coef / z.z1);
    if constexpr (CE) g[job.label] -= job.ce_coef;
  }
  return out;
}

// kl_ce_row for the divergence D.
template <Divergence D>
DISTIL_INLINE RowLoss kl_ce_row_of(const float* s, const float* t, int64_t V, float temperature, float param,
                                   const RowJob& job, float* g, float* scratch) {
  const float ms = row_max(s, V);
  const float mt = job.kl ? row_max(t, V) : 0.f;
  // A NaN in a row a part reads makes that part NaN, and the row's gradient, as in PyTorch.
  const bool kl_nan = job.kl && (std::isnan(ms) || std::isnan(mt));
  const bool ce_nan = job.label >= 0 && std::isnan(ms);
  if (kl_nan || ce_nan) {
    RowLoss out;
    if (!ce_nan && job.label >= 0 && ms != kNegInf) {
      out = kl_ce_row_impl<false, true, D>(s, t, V, temperature, param, job, ms, mt, nullptr, scratch);
    }
    if (kl_nan) out.kl = kNaN;
    if (ce_nan) out.ce = kNaN;
    if (g) std::fill(g, g + V, kNaN);
    return out;
  }
  // A row that is -inf everywhere has no distribution: its loss and gradient are 0.
  const bool kl = job.kl && ms != kNegInf && mt != kNegInf;
  const bool ce = job.label >= 0 && ms != kNegInf;
  if (kl && ce) return kl_ce_row_impl<true, true, D>(s, t, V, temperature, param, job, ms, mt, g, scratch);
  if (kl) return kl_ce_row_impl<true, false, D>(s, t, V, temperature, param, job, ms, mt, g, scratch);
  if (ce) return kl_ce_row_impl<false, true, D>(s, t, V, temperature, param, job, ms, mt, g, scratch);
  if (g) std::fill(g, g + V, 0.f);
  return {};
}

// Losses of one fp32 row and, when g is given, its gradient job.kl_coef * dKL + job.ce_coef * dCE
// (zeros where neither applies); "KL" is the divergence chosen (divergence.h, param its parameter).
// scratch holds 3 V floats.
DISTIL_CLONES RowLoss kl_ce_row(const float* s, const float* t, int64_t V, float temperature, Divergence divergence,
                                float param, RowJob job, float* g, float* scratch) {
  switch (divergence) {
    case Divergence::ForwardKL:
      return kl_ce_row_of<Divergence::ForwardKL>(s, t, V, temperature, param, job, g, scratch);
    case Divergence::ReverseKL:
      return kl_ce_row_of<Divergence::ReverseKL>(s, t, V, temperature, param, job, g, scratch);
    case Divergence::JSD:
      return kl_ce_row_of<Divergence::JSD>(s, t, V, temperature, param, job, g, scratch);
    case Divergence::SkewKL:
      return kl_ce_row_of<Divergence::SkewKL>(s, t, V, temperature, param, job, g, scratch);
    case Divergence::SkewReverseKL:
      return kl_ce_row_of<Divergence::SkewReverseKL>(s, t, V, temperature, param, job, g, scratch);
    case Divergence::TVD:
      return kl_ce_row_of<Divergence::TVD>(s, t, V, temperature, param, job, g, scratch);
  }
  return {};
}

// The arguments the three ops share, checked: TwoTermArgs (rows.h), the teacher and the divergence.
struct Problem : TwoTermArgs {
  const Tensor& teacher;
  Divergence divergence;
  float divergence_param;

  Problem(const Tensor& student_, const Tensor& teacher_, const std::optional<Tensor>& labels_,
          const std::optional<Tensor>& kl_mask_, const Tensor& coef, double temperature, int64_t ignore_index_,
          c10::string_view divergence_, double divergence_param_)
      : TwoTermArgs(kOp, student_, labels_, kl_mask_, coef, temperature, ignore_index_),
        teacher(teacher_),
        divergence(parse_divergence(kOp, divergence_, divergence_param_)),
        divergence_param(static_cast<float>(divergence_param_)) {
    check_float_rows(kOp, "teacher", teacher);
    TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), kOp, ": teacher has shape ", teacher.sizes(),
                      " but student has shape ", student.sizes());
  }
};

// Per-thread row evaluator: gives kl_ce_row fp32 rows, converting bf16/fp16 rows in
// and the gradient out through its own buffers.
template <typename StudentT, typename TeacherT>
class RowRunner {
 public:
  explicit RowRunner(const Problem& pb)
      : pb_(pb),
        s_(row_values<StudentT>(pb.student, pb.student.dim() - 1)),
        t_(row_values<TeacherT>(pb.teacher, pb.teacher.dim() - 1)),
        buf_((3 + 2 * !std::is_same_v<StudentT, float> + !std::is_same_v<TeacherT, float>) * pb.V) {}

  // Losses of row r; writes job's gradient into g (a contiguous student-dtype row) when given.
  RowLoss run(int64_t r, const RowJob& job, StudentT* g) {
    const int64_t V = pb_.V;
    float* const scratch = buf_.data();
    const auto [sf, gf] = fp32_student_row(s_.data + s_.off(r), g, scratch + 3 * V, V);
    float* const teacher_copy = scratch + (3 + 2 * !std::is_same_v<StudentT, float>) * V;
    const float* tf = teacher_copy;
    if constexpr (std::is_same_v<TeacherT, float>) {
      tf = t_.data + t_.off(r);
    } else if (job.kl) {
      load_row(teacher_copy, t_.data + t_.off(r), V);
    }
    const RowLoss loss = kl_ce_row(sf, tf, V, pb_.temperature, pb_.divergence, pb_.divergence_param, job, gf, scratch);
    store_student_grad(g, gf, V);
    return loss;
  }

 private:
  const Problem& pb_;
  RowValues<StudentT> s_;
  RowValues<TeacherT> t_;
  std::vector<float> buf_;  // 3 V of scratch, then fp32 copies of narrower rows
};

std::tuple<Tensor, Tensor, Tensor> kl_ce_rows_cpu(const Tensor& student, const Tensor& teacher,
                                                  const std::optional<Tensor>& labels,
                                                  const std::optional<Tensor>& kl_mask, const Tensor& coef,
                                                  double temperature, int64_t ignore_index, bool compute_grad,
                                                  c10::string_view divergence, double divergence_param) {
  const Problem pb(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence, divergence_param);
  auto [kl_rows, ce_rows, grad] = two_term_outputs(student, compute_grad);
  fill_two_term_rows<RowRunner>(pb, teacher.scalar_type(), kl_rows.data_ptr<float>(), ce_rows.data_ptr<float>(),
                                compute_grad ? grad.data_ptr() : nullptr);
  return {kl_rows, ce_rows, grad};
}

void kl_ce_rows_into_cpu(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& labels,
                         const std::optional<Tensor>& kl_mask, const Tensor& coef, double temperature,
                         int64_t ignore_index, Tensor& kl_rows, Tensor& ce_rows, const std::optional<Tensor>& grad,
                         c10::string_view divergence, double divergence_param) {
  const Problem pb(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence, divergence_param);
  for (const auto& [name, x] : {std::pair<const char*, const Tensor&>{"kl_rows", kl_rows}, {"ce_rows", ce_rows}}) {
    check_rows_tensor("kl_ce_rows_into", name, x, student, at::kFloat);
    TORCH_CHECK_VALUE(x.is_contiguous(), "kl_ce_rows_into: ", name, " must be contiguous");
  }
  if (grad) {
    check_cpu("kl_ce_rows_into", "grad", *grad);
    TORCH_CHECK_TYPE(grad->scalar_type() == student.scalar_type(), "kl_ce_rows_into: grad must have dtype ",
                     student.scalar_type(), ", got ", grad->scalar_type());
    TORCH_CHECK_VALUE(grad->sizes() == student.sizes() && grad->is_contiguous(),
                      "kl_ce_rows_into: grad must be contiguous with shape ", student.sizes(), ", got ",
                      grad->sizes(), " with strides ", grad->strides());
  }
  fill_two_term_rows<RowRunner>(pb, teacher.scalar_type(), kl_rows.data_ptr<float>(), ce_rows.data_ptr<float>(),
                                grad ? const_cast<Tensor&>(*grad).data_ptr() : nullptr);
}

void kl_ce_rows_backward_cpu(Tensor& grad, const Tensor& grad_kl_rows, const Tensor& grad_ce_rows,
                             const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& labels,
                             const std::optional<Tensor>& kl_mask, const Tensor& coef, double temperature,
                             int64_t ignore_index, c10::string_view divergence, double divergence_param) {
  const Problem pb(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence, divergence_param);
  rewrite_two_term_grad<RowRunner>("kl_ce_rows_backward", grad, grad_kl_rows, grad_ce_rows, pb,
                                   teacher.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distil, m) {
  // Temperature KL + cross-entropy per row of [N, V] or [B, S, V] logits. Returns (kl_rows, ce_rows,
  // grad): kl_rows = T^2 * KL(softmax(t/T) || softmax(s/T)) where kl_mask (every row when absent), or
  // T^2 times another divergence (divergence.h: reverse_kl, jsd, skew_kl, skew_reverse_kl with
  // divergence_param in (0, 1), tvd);
  // ce_rows = cross_entropy(s, label) where label != ignore_index; grad = coef[0] * d kl_rows/ds +
  // coef[1] * d ce_rows/ds in the student's dtype, written only when compute_grad (else empty).
  m.def(
      "kl_ce_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, "
      "float temperature, int ignore_index, bool compute_grad, str divergence=\"forward_kl\", "
      "float divergence_param=0.0) -> (Tensor, Tensor, Tensor)");
  // kl_ce_rows into the caller's buffers: kl_rows, ce_rows fp32 contiguous over the row dims, grad
  // (optional) contiguous in the student's shape and dtype. grad may be the student tensor itself
  // (each row is read before it is written), so that a chunked caller keeps one [rows, V] buffer.
  m.def(
      "kl_ce_rows_into(Tensor student, Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, "
      "float temperature, int ignore_index, Tensor(a!) kl_rows, Tensor(b!) ce_rows, Tensor(c!)? grad, "
      "str divergence=\"forward_kl\", float divergence_param=0.0) -> ()");
  // Turns the forward's grad (made for coef) into the gradient for the incoming per-row
  // gradients, in place: nothing when they equal coef, a per-row scale when they are
  // proportional to it, else a recomputation.
  m.def(
      "kl_ce_rows_backward(Tensor(a!) grad, Tensor grad_kl_rows, Tensor grad_ce_rows, Tensor student, "
      "Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, float temperature, int ignore_index, "
      "str divergence=\"forward_kl\", float divergence_param=0.0) -> ()");
}

TORCH_LIBRARY_IMPL(distil, CPU, m) {
  m.impl("kl_ce_rows", &kl_ce_rows_cpu);
  m.impl("kl_ce_rows_into", &kl_ce_rows_into_cpu);
  m.impl("kl_ce_rows_backward", &kl_ce_rows_backward_cpu);
}

}  // namespace distil::cpu
