// distil::kl_ce_rows and distil::kl_ce_rows_backward: schemas and CPU kernels (the CUDA twin
// is kernels/kl_ce.py, whose docstring states the contract).  Per row this is
//   kl_rows = nn.KLDivLoss(reduction="none")(log_softmax(s/T), softmax(t/T)).sum(-1) * T**2
//   ce_rows = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
// (distiller.py's loss_ce and loss_mlm before their batchmean / mean), with the gradient of
// coef[0] * kl_rows + coef[1] * ce_rows written in the forward.
// One thread handles whole rows (at::parallel_for);
// a row of V = 30522 logits is 120 KB in fp32, so the three passes below (maxima; the
// exp-sums, storing the exponentials; the gradient) run out of L2 and DRAM sees each
// input once and the gradient once.
//
// The extension is built without -march, so the row kernels are compiled once per
// x86-64 level with GCC's target_clones (an ifunc picks the clone at load time, as
// ATen's DispatchStub picks its DEFAULT/AVX2/AVX512 kernels) and written as plain
// loops with an exp of our own that the compiler vectorises in every clone.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "rows.h"

#include <algorithm>
#include <c10/util/bit_cast.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISTIL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISTIL_CLONES
#endif
#define DISTIL_INLINE inline __attribute__((always_inline))

namespace {

using at::Tensor;
using distil::cpu::dispatch_pair;
using distil::cpu::rescale_keeps_precision;
using distil::cpu::row_offsets;
using distil::cpu::RowOffsets;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// (g_kl, g_ce) counts as proportional to (kl_coef, ce_coef) within this relative tolerance (the same
// rule as kernels/kl_ce.py); the buffer is then rescaled, else the row is recomputed.
constexpr double kProportionalTolerance = 1e-6;

// e^x for x <= 0 (always a logit minus its row maximum): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 Taylor polynomial (error ~1e-7 relative)
// and 2^n built in the exponent bits.  Results below e^-87 (~1.6e-38, where 2^n
// would leave the normal range) are flushed to 0, so e^-inf = 0.  Branch-free so
// that the loops calling it vectorise.
DISTIL_INLINE float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer (no -ffast-math
  // here, so the compiler keeps both operations).
  const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = c10::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

// e^y - 1 for |y| <= 1/4: Taylor to y^6 (truncation < 5e-8 relative), where e^y - 1 from exp_nonpos
// would cancel.
DISTIL_INLINE float expm1_small(float y) {
  return y * (1.0f + y * (0.5f + y * (1.0f / 6.0f + y * (1.0f / 24.0f + y * (1.0f / 120.0f + y * (1.0f / 720.0f))))));
}

// The row maximum, NaN when the row holds a NaN (a max alone skips NaN, so an all-NaN row would pass
// for a row that is -inf everywhere, with loss 0).
DISTIL_INLINE float row_max(const float* x, int64_t n) {
  float m = kNegInf;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    nan |= x[j] != x[j];
  }
  return nan ? kNaN : m;
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

// What one row needs: KL on or off, the label (or -1), and the coefficients of the KL and
// CE gradients (coef[0], coef[1] in the forward; the incoming row gradients when the
// backward recomputes).
struct RowJob {
  bool kl;
  int64_t label;
  float kl_coef;
  float ce_coef;
};

struct RowLoss {
  float kl = 0.f;
  float ce = 0.f;
};

template <bool KL, bool CE>
DISTIL_INLINE RowLoss kl_ce_row_impl(const float* s, const float* t, int64_t V, float temperature,
                                     const RowJob& job, float ms, float mt, float* g, float* scratch) {
  const float T = temperature;
  const float inv_t = 1.0f / T;
  float* es = scratch;
  float* et = scratch + V;
  float* e1 = scratch + 2 * V;
  const Sums z = g ? row_sums<KL, CE, true>(s, t, V, inv_t, ms, mt, es, et, e1)
                   : row_sums<KL, CE, false>(s, t, V, inv_t, ms, mt, es, et, e1);
  RowLoss out;
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

// Losses of one fp32 row and, when g is given, its gradient job.kl_coef * dKL + job.ce_coef * dCE
// (zeros where neither applies).  scratch holds 3 V floats.
DISTIL_CLONES RowLoss kl_ce_row(const float* s, const float* t, int64_t V, float temperature, RowJob job,
                                float* g, float* scratch) {
  const float ms = row_max(s, V);
  const float mt = job.kl ? row_max(t, V) : 0.f;
  // A NaN in a row a part reads makes that part NaN, and the row's gradient, as in PyTorch.
  const bool kl_nan = job.kl && (std::isnan(ms) || std::isnan(mt));
  const bool ce_nan = job.label >= 0 && std::isnan(ms);
  if (kl_nan || ce_nan) {
    RowLoss out;
    if (!ce_nan && job.label >= 0 && ms != kNegInf) {
      out = kl_ce_row_impl<false, true>(s, t, V, temperature, job, ms, mt, nullptr, scratch);
    }
    if (kl_nan) out.kl = kNaN;
    if (ce_nan) out.ce = kNaN;
    if (g) std::fill(g, g + V, kNaN);
    return out;
  }
  // A row that is -inf everywhere has no distribution: its loss and gradient are 0.
  const bool kl = job.kl && ms != kNegInf && mt != kNegInf;
  const bool ce = job.label >= 0 && ms != kNegInf;
  if (kl && ce) return kl_ce_row_impl<true, true>(s, t, V, temperature, job, ms, mt, g, scratch);
  if (kl) return kl_ce_row_impl<true, false>(s, t, V, temperature, job, ms, mt, g, scratch);
  if (ce) return kl_ce_row_impl<false, true>(s, t, V, temperature, job, ms, mt, g, scratch);
  if (g) std::fill(g, g + V, 0.f);
  return {};
}

template <typename Scalar>
DISTIL_INLINE void load_row(float* dst, const Scalar* src, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename Scalar>
DISTIL_INLINE void store_row(Scalar* dst, const float* src, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<Scalar>(src[j]);
}

template <typename Scalar>
struct RowValues {
  const Scalar* data;
  RowOffsets off;
  Scalar operator[](int64_t r) const { return data[off(r)]; }
};

template <typename Scalar>
RowValues<Scalar> row_values(const Tensor& x, int64_t row_dims) {
  return {x.const_data_ptr<Scalar>(), row_offsets(x, row_dims)};
}

void check_cpu(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "kl_ce_rows: ", name, " must be a CPU tensor, got ", x.device());
}

void check_rows_tensor(const char* name, const Tensor& x, const Tensor& student, at::ScalarType dtype) {
  check_cpu(name, x);
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, "kl_ce_rows: ", name, " must have dtype ", dtype, ", got ",
                   x.scalar_type());
  const auto rows = student.sizes().slice(0, student.dim() - 1);
  TORCH_CHECK_VALUE(x.sizes() == rows, "kl_ce_rows: ", name, " must have shape ", rows, ", got ", x.sizes());
}

// The arguments both ops share, checked, with the per-row label / mask lookup.
struct Problem {
  const Tensor& student;
  const Tensor& teacher;
  std::optional<RowValues<int64_t>> labels;
  std::optional<RowValues<bool>> kl_mask;
  float kl_coef;  // coef[0]
  float ce_coef;  // coef[1]
  float temperature;
  int64_t ignore_index;
  int64_t N;
  int64_t V;

  Problem(const Tensor& student_, const Tensor& teacher_, const std::optional<Tensor>& labels_,
          const std::optional<Tensor>& kl_mask_, const Tensor& coef, double temperature, int64_t ignore_index_)
      : student(student_), teacher(teacher_), ignore_index(ignore_index_) {
    for (const auto& [name, x] : {std::pair<const char*, const Tensor&>{"student", student}, {"teacher", teacher}}) {
      check_cpu(name, x);
      TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                           x.scalar_type() == at::kHalf,
                       "kl_ce_rows: ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
      TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "kl_ce_rows: ", name, " must be [N, V] or [B, S, V], got ",
                        x.sizes());
      TORCH_CHECK_VALUE(x.size(-1) <= 1 || x.stride(-1) == 1, "kl_ce_rows: ", name,
                        " must have a unit stride in its last dim, got strides ", x.strides());
    }
    TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "kl_ce_rows: teacher has shape ", teacher.sizes(),
                      " but student has shape ", student.sizes());
    const int64_t row_dims = student.dim() - 1;
    if (labels_) {
      check_rows_tensor("labels", *labels_, student, at::kLong);
      labels = row_values<int64_t>(*labels_, row_dims);
    }
    if (kl_mask_) {
      check_rows_tensor("kl_mask", *kl_mask_, student, at::kBool);
      kl_mask = row_values<bool>(*kl_mask_, row_dims);
    }
    check_cpu("coef", coef);
    TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "kl_ce_rows: coef must be float32, got ", coef.scalar_type());
    TORCH_CHECK_VALUE(coef.numel() == 2, "kl_ce_rows: coef must have 2 elements, got ", coef.numel());
    const Tensor c = coef.contiguous();
    kl_coef = c.const_data_ptr<float>()[0];
    ce_coef = c.const_data_ptr<float>()[1];
    TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                      "kl_ce_rows: temperature must be finite and > 0, got ", temperature);
    this->temperature = static_cast<float>(temperature);
    N = c10::multiply_integers(student.sizes().slice(0, row_dims));
    V = student.size(-1);
  }

  // Row r's KL flag and label (-1 when ignored), with the gradient coefficients of its two terms.
  RowJob job(int64_t r, float kl_row_coef, float ce_row_coef) const {
    int64_t y = labels ? (*labels)[r] : ignore_index;
    if (y == ignore_index) {
      y = -1;
    } else {
      TORCH_CHECK_INDEX(y >= 0 && y < V, "kl_ce_rows: label ", y, " of row ", r, " is outside [0, ", V, ")");
    }
    return {kl_mask ? (*kl_mask)[r] : true, y, kl_row_coef, ce_row_coef};
  }

  // Rows per at::parallel_for task: about 32K logits, at least one row.
  int64_t grain() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }
};

// Per-thread row evaluator: gives kl_ce_row fp32 rows, converting bf16/fp16 rows in
// and the gradient out through its own buffers.
template <typename StudentT, typename TeacherT>
class RowRunner {
 public:
  explicit RowRunner(const Problem& pb)
      : pb_(pb),
        s_{pb.student.const_data_ptr<StudentT>(), row_offsets(pb.student, pb.student.dim() - 1)},
        t_{pb.teacher.const_data_ptr<TeacherT>(), row_offsets(pb.teacher, pb.teacher.dim() - 1)},
        buf_((3 + 2 * !std::is_same_v<StudentT, float> + !std::is_same_v<TeacherT, float>) * pb.V) {}

  // Losses of row r; writes job's gradient into g (a contiguous student-dtype row) when given.
  RowLoss run(int64_t r, const RowJob& job, StudentT* g) {
    const int64_t V = pb_.V;
    float* const scratch = buf_.data();
    float* extra = scratch + 3 * V;
    const float* sf;
    const float* tf;
    float* gf = nullptr;
    if constexpr (std::is_same_v<StudentT, float>) {
      sf = s_.data + s_.off(r);
      gf = g;
    } else {
      load_row(extra, s_.data + s_.off(r), V);
      sf = extra;
      if (g) gf = extra + V;
      extra += 2 * V;
    }
    if constexpr (std::is_same_v<TeacherT, float>) {
      tf = t_.data + t_.off(r);
    } else {
      if (job.kl) load_row(extra, t_.data + t_.off(r), V);
      tf = extra;
    }
    const RowLoss loss = kl_ce_row(sf, tf, V, pb_.temperature, job, gf, scratch);
    if constexpr (!std::is_same_v<StudentT, float>) {
      if (g) store_row(g, gf, V);
    }
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
                                                  double temperature, int64_t ignore_index, bool compute_grad) {
  const Problem pb(student, teacher, labels, kl_mask, coef, temperature, ignore_index);
  const auto row_shape = student.sizes().slice(0, student.dim() - 1);
  Tensor kl_rows = at::empty(row_shape, student.options().dtype(at::kFloat));
  Tensor ce_rows = at::empty(row_shape, student.options().dtype(at::kFloat));
  Tensor grad = compute_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  float* kl = kl_rows.data_ptr<float>();
  float* ce = ce_rows.data_ptr<float>();
  dispatch_pair(pb.student.scalar_type(), pb.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    S* g = compute_grad ? grad.data_ptr<S>() : nullptr;
    at::parallel_for(0, pb.N, pb.grain(), [&](int64_t begin, int64_t end) {
      RowRunner<S, decltype(t_tag)> runner(pb);
      for (int64_t r = begin; r < end; ++r) {
        const RowLoss loss = runner.run(r, pb.job(r, pb.kl_coef, pb.ce_coef), g ? g + r * pb.V : nullptr);
        kl[r] = loss.kl;
        ce[r] = loss.ce;
      }
    });
  });
  return {kl_rows, ce_rows, grad};
}

void kl_ce_rows_backward_cpu(Tensor& grad, const Tensor& grad_kl_rows, const Tensor& grad_ce_rows,
                             const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& labels,
                             const std::optional<Tensor>& kl_mask, const Tensor& coef, double temperature,
                             int64_t ignore_index) {
  const Problem pb(student, teacher, labels, kl_mask, coef, temperature, ignore_index);
  check_cpu("grad", grad);
  TORCH_CHECK_TYPE(grad.scalar_type() == student.scalar_type(), "kl_ce_rows_backward: grad must have dtype ",
                   student.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == student.sizes() && grad.is_contiguous(),
                    "kl_ce_rows_backward: grad must be contiguous with shape ", student.sizes(), ", got ",
                    grad.sizes(), " with strides ", grad.strides());
  check_rows_tensor("grad_kl_rows", grad_kl_rows, student, at::kFloat);
  check_rows_tensor("grad_ce_rows", grad_ce_rows, student, at::kFloat);
  const int64_t row_dims = student.dim() - 1;
  const RowValues<float> gkl = row_values<float>(grad_kl_rows, row_dims);
  const RowValues<float> gce = row_values<float>(grad_ce_rows, row_dims);
  const double kl_coef = pb.kl_coef, ce_coef = pb.ce_coef;
  dispatch_pair(pb.student.scalar_type(), pb.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    S* const g = grad.data_ptr<S>();
    at::parallel_for(0, pb.N, pb.grain(), [&](int64_t begin, int64_t end) {
      std::optional<RowRunner<S, decltype(t_tag)>> runner;  // only rows that need recomputing read the logits
      for (int64_t r = begin; r < end; ++r) {
        const double gk = gkl[r], gc = gce[r];
        const RowJob job = pb.job(r, gk, gc);
        // A part whose coef and incoming gradient are both 0 is 0 in both gradients.
        const bool kl = job.kl && !(kl_coef == 0 && gk == 0);
        const bool ce = job.label >= 0 && !(ce_coef == 0 && gc == 0);
        if (!kl && !ce) continue;
        S* const row = g + r * pb.V;
        double scale;
        bool proportional;
        if (kl && ce) {
          scale = gk / kl_coef;
          proportional = kl_coef != 0 && ce_coef != 0 &&
                         std::abs(gk * ce_coef - gc * kl_coef) <=
                             kProportionalTolerance * std::max(std::abs(gk * ce_coef), std::abs(gc * kl_coef));
        } else {
          scale = kl ? gk / kl_coef : gc / ce_coef;
          proportional = (kl ? kl_coef : ce_coef) != 0;
        }
        if (!proportional || !rescale_keeps_precision(scale, !std::is_same_v<S, float>)) {
          if (!runner) runner.emplace(pb);
          runner->run(r, job, row);
        } else if (static_cast<float>(scale) != 1.f) {  // exactly coef: the buffer is the gradient
          const float f = static_cast<float>(scale);
#pragma omp simd
          for (int64_t j = 0; j < pb.V; ++j) row[j] = static_cast<S>(static_cast<float>(row[j]) * f);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distil, m) {
  // Temperature KL + cross-entropy per row of [N, V] or [B, S, V] logits. Returns (kl_rows, ce_rows,
  // grad): kl_rows = T^2 * KL(softmax(t/T) || softmax(s/T)) where kl_mask (every row when absent);
  // ce_rows = cross_entropy(s, label) where label != ignore_index; grad = coef[0] * d kl_rows/ds +
  // coef[1] * d ce_rows/ds in the student's dtype, written only when compute_grad (else empty).
  m.def(
      "kl_ce_rows(Tensor student, Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, "
      "float temperature, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // Turns the forward's grad (made for coef) into the gradient for the incoming per-row
  // gradients, in place: nothing when they equal coef, a per-row scale when they are
  // proportional to it, else a recomputation.
  m.def(
      "kl_ce_rows_backward(Tensor(a!) grad, Tensor grad_kl_rows, Tensor grad_ce_rows, Tensor student, "
      "Tensor teacher, Tensor? labels, Tensor? kl_mask, Tensor coef, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(distil, CPU, m) {
  m.impl("kl_ce_rows", &kl_ce_rows_cpu);
  m.impl("kl_ce_rows_backward", &kl_ce_rows_backward_cpu);
}
