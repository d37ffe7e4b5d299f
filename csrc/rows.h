// Helpers shared by the CPU kernels of the row-wise losses (kl_ce.cpp, cosine.cpp,
// topk_kl_ce.cpp): dispatch on the float dtypes we accept, addressing of row r of an [N, D] or
// [B, S, D] tensor read in place through its strides, the checks, the allocation of the gradient
// buffers, the vectorisable fp32 row primitives (exp, max, dtype conversion), and what the two-term
// (KL, CE) ops share around their row functions (arguments, outputs, the row loops of the forward and
// the backward).
//
// The extension is built without -march, so the row kernels are compiled once per x86-64 level
// with GCC's target_clones (an ifunc picks the clone at load time, as ATen's DispatchStub picks
// its DEFAULT/AVX2/AVX512 kernels): a kernel marks its row function DISTIL_CLONES and the
// always-inline primitives below are vectorised inside every clone.
#pragma once

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>


#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISTIL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISTIL_CLONES
#endif
#define DISTIL_INLINE inline __attribute__((always_inline))

namespace distil::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Calls fn with a value of the C++ type of a (validated) float32 / bfloat16 / float16 dtype.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, "distil: unexpected dtype ", dtype);
  }
}

// Calls fn(a_tag, b_tag) for two tensors' float dtypes (student and teacher may differ).
template <typename Fn>
void dispatch_pair(at::ScalarType a, at::ScalarType b, Fn&& fn) {
  dispatch_float(a, [&](auto a_tag) { dispatch_float(b, [&](auto b_tag) { fn(a_tag, b_tag); }); });
}

// Element offset of flat row r of a tensor whose leading 1 or 2 dims are the row dims
// (any strides, including the 0 strides of expanded views).
struct RowOffsets {
  int64_t inner;         // size of the last row dim
  int64_t outer_stride;  // stride of the first row dim when there are two, else 0
  int64_t inner_stride;
  int64_t operator()(int64_t r) const { return (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

inline RowOffsets row_offsets(const at::Tensor& x, int64_t row_dims) {
  return {std::max<int64_t>(x.size(row_dims - 1), 1), row_dims == 2 ? x.stride(0) : 0, x.stride(row_dims - 1)};
}

// An uninitialised contiguous tensor for a gradient that the kernel writes exactly once. It is
// fresh memory on every call (autograd hands it to .grad), and at ~2 GB/s of 4 KB first-touch page
// faults the faults cost more than the kernel's own pass: 12288 of them for a 16384 x 768 fp32
// buffer. From 2 MB on, the buffer is 2 MB-aligned and advised as transparent huge pages
// (MADV_HUGEPAGE, honoured in the kernel's default "madvise" THP mode), so it takes one fault per
// 2 MB instead; elsewhere (other OS, THP off) this is an ordinary allocation.
inline at::Tensor empty_written_once(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHugePage) {
    const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, length);
    TORCH_CHECK(data != nullptr, "distil: out of memory allocating ", length, " bytes");
    madvise(data, length, MADV_HUGEPAGE);  // advice only: failure leaves 4 KB pages
    return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
  }
#endif
  return at::empty(sizes, options);
}

// One value per row (labels, masks, per-row gradients) read in place.
template <typename T>
struct RowValues {
  const T* data;
  RowOffsets off;
  T operator[](int64_t r) const { return data[off(r)]; }
};

template <typename T>
RowValues<T> row_values(const at::Tensor& x, int64_t row_dims) {
  return {x.const_data_ptr<T>(), row_offsets(x, row_dims)};
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
}

// A per-row tensor of `rows`' leading (row) dims with the given dtype.
inline void check_rows_tensor(const char* op, const char* name, const at::Tensor& x, const at::Tensor& rows,
                              at::ScalarType dtype) {
  check_cpu(op, name, x);
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", x.scalar_type());
  const auto shape = rows.sizes().slice(0, rows.dim() - 1);
  TORCH_CHECK_VALUE(x.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

// A float32 / bfloat16 / float16 CPU tensor of rows ([N, D] or [B, S, D]) with a unit stride along D.
inline void check_float_rows(const char* op, const char* name, const at::Tensor& x) {
  check_cpu(op, name, x);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   op, ": ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": ", name, " must be [N, D] or [B, S, D], got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(-1) <= 1 || x.stride(-1) == 1, op, ": ", name,
                    " must have a unit stride in its last dim, got strides ", x.strides());
}

// Rows of D elements per at::parallel_for task: about 32K elements, so that a task outweighs its cost.
inline int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

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

template <typename T>
DISTIL_INLINE void load_row(float* dst, const T* src, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
DISTIL_INLINE void store_row(T* dst, const float* src, int64_t V) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<T>(src[j]);
}

// A student row as the fp32 row functions take it: the row itself and g when S is float, else an fp32
// copy in `copy` (2 V floats: the row, then its gradient, which store_student_grad writes back).
struct Fp32Row {
  const float* s;
  float* g;
};

template <typename S>
DISTIL_INLINE Fp32Row fp32_student_row(const S* row, S* g, float* copy, int64_t V) {
  if constexpr (std::is_same_v<S, float>) {
    return {row, g};
  } else {
    load_row(copy, row, V);
    return {copy, g ? copy + V : nullptr};
  }
}

template <typename S>
DISTIL_INLINE void store_student_grad(S* g, const float* gf, int64_t V) {
  if constexpr (!std::is_same_v<S, float>) {
    if (g) store_row(g, gf, V);
  }
}

// What one row of the two-term (KL, CE) ops needs: its KL flag, its label (-1 without a CE term), and
// the coefficients of its two gradients (coef in the forward; the incoming row gradients when the
// backward recomputes).
struct RowJob {
  bool kl;
  int64_t label;
  float kl_coef;
  float ce_coef;
};

// The two losses of one row.
struct RowLoss {
  float kl = 0.f;
  float ce = 0.f;
};

// The arguments the two-term (KL, CE) row ops share, checked: the student's rows, the optional per-row
// labels (int64) and kl_mask (bool), coef = [kl_coef, ce_coef] (float32) and the temperature; job(r, ...)
// is row r's RowJob. Each op's Problem derives from it and adds its teacher.
struct TwoTermArgs {
  const char* op;
  const at::Tensor& student;
  std::optional<RowValues<int64_t>> labels;
  std::optional<RowValues<bool>> kl_mask;
  float kl_coef;  // coef[0]
  float ce_coef;  // coef[1]
  float temperature;
  int64_t ignore_index;
  int64_t N;
  int64_t V;

  TwoTermArgs(const char* op_, const at::Tensor& student_, const std::optional<at::Tensor>& labels_,
              const std::optional<at::Tensor>& kl_mask_, const at::Tensor& coef, double temperature_,
              int64_t ignore_index_)
      : op(op_), student(student_), ignore_index(ignore_index_) {
    check_float_rows(op, "student", student);
    const int64_t row_dims = student.dim() - 1;
    if (labels_) {
      check_rows_tensor(op, "labels", *labels_, student, at::kLong);
      labels = row_values<int64_t>(*labels_, row_dims);
    }
    if (kl_mask_) {
      check_rows_tensor(op, "kl_mask", *kl_mask_, student, at::kBool);
      kl_mask = row_values<bool>(*kl_mask_, row_dims);
    }
    check_cpu(op, "coef", coef);
    TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ", coef.scalar_type());
    TORCH_CHECK_VALUE(coef.numel() == 2, op, ": coef must have 2 elements, got ", coef.numel());
    const at::Tensor c = coef.contiguous();
    kl_coef = c.const_data_ptr<float>()[0];
    ce_coef = c.const_data_ptr<float>()[1];
    TORCH_CHECK_VALUE(std::isfinite(temperature_) && temperature_ > 0, op,
                      ": temperature must be finite and > 0, got ", temperature_);
    temperature = static_cast<float>(temperature_);
    N = c10::multiply_integers(student.sizes().slice(0, row_dims));
    V = student.size(-1);
  }

  // Row r's KL flag and label (-1 when ignored), with the gradient coefficients of its two terms.
  RowJob job(int64_t r, float kl_row_coef, float ce_row_coef) const {
    int64_t y = labels ? (*labels)[r] : ignore_index;
    if (y == ignore_index) {
      y = -1;
    } else {
      TORCH_CHECK_VALUE(y >= 0 && y < V, op, ": label ", y, " of row ", r, " is outside [0, ", V, ")");
    }
    return {kl_mask ? (*kl_mask)[r] : true, y, kl_row_coef, ce_row_coef};
  }

  int64_t grain() const { return grain_rows(V); }
};

// A two-term op's forward outputs: kl_rows and ce_rows (fp32 over the row dims) and the gradient buffer
// (the student's shape and dtype; empty without compute_grad).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> two_term_outputs(const at::Tensor& student, bool compute_grad) {
  const auto row_shape = student.sizes().slice(0, student.dim() - 1);
  return {at::empty(row_shape, student.options().dtype(at::kFloat)),
          at::empty(row_shape, student.options().dtype(at::kFloat)),
          compute_grad ? empty_written_once(student.sizes(), student.options()) : at::empty({0}, student.options())};
}

// A two-term op's forward rows into kl / ce (fp32, one per row) and, when g_data is given, the gradient
// rows (contiguous, student dtype), by a Runner<StudentT, TeacherT>(pb) per task: run(r, job, g_row).
// g may be the student's own storage: each row is read before it is written.
template <template <typename, typename> class Runner, typename Problem>
void fill_two_term_rows(const Problem& pb, at::ScalarType teacher_dtype, float* kl, float* ce, void* g_data) {
  dispatch_pair(pb.student.scalar_type(), teacher_dtype, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    S* g = static_cast<S*>(g_data);
    at::parallel_for(0, pb.N, pb.grain(), [&](int64_t begin, int64_t end) {
      Runner<S, decltype(t_tag)> runner(pb);
      for (int64_t r = begin; r < end; ++r) {
        const RowLoss loss = runner.run(r, pb.job(r, pb.kl_coef, pb.ce_coef), g ? g + r * pb.V : nullptr);
        kl[r] = loss.kl;
        ce[r] = loss.ce;
      }
    });
  });
}

// Whether the backward may rescale a gradient row the forward wrote by `factor` (the incoming
// gradient over the announced coefficient) instead of recomputing it. An fp32 row always: one more
// rounding. A 16-bit row only by a factor in [1/2, 2]: a farther one (a loss scale, 1/grad_accum)
// would carry the forward's rounding into the gradient, fp16's underflow of small entries included
// (zeros multiplied by 65536 stay zeros). kernels/ use the same rule.
inline bool rescale_keeps_precision(double factor, bool narrow) {
  const double f = std::abs(factor);
  return !narrow || (f >= 0.5 && f <= 2.0);
}

// The backward of the two-term (KL, CE) row ops: the forward wrote, per row, the gradient of
// kl_coef * kl_row + ce_coef * ce_row.  For the incoming per-row gradients (grad_kl_rows, grad_ce_rows)
// a row is rescaled in place when they are proportional to (kl_coef, ce_coef) within 1e-6 relative
// (left as it is when the factor is exactly 1: the usual loss.backward()) if rescale_keeps_precision,
// and recomputed otherwise by
// a Runner(pb) (built on the first such row of each task: other rows never read the inputs).
// Problem: N, V, grain(), job(r, kl_coef, ce_coef) -> RowJob;
// Runner: run(r, job, row) writes the row's gradient.  A part whose coef and incoming gradient are
// both 0 is 0 in both gradients, so it does not break proportionality.
template <typename Runner, typename S, typename Problem>
void rescale_or_recompute_rows(S* g, const Problem& pb, const at::Tensor& grad_kl_rows,
                               const at::Tensor& grad_ce_rows, double kl_coef, double ce_coef) {
  constexpr double kProportionalTolerance = 1e-6;
  const int64_t row_dims = grad_kl_rows.dim();
  const RowValues<float> gkl = row_values<float>(grad_kl_rows, row_dims);
  const RowValues<float> gce = row_values<float>(grad_ce_rows, row_dims);
  at::parallel_for(0, pb.N, pb.grain(), [&](int64_t begin, int64_t end) {
    std::optional<Runner> runner;
    for (int64_t r = begin; r < end; ++r) {
      const double gk = gkl[r], gc = gce[r];
      const auto job = pb.job(r, gk, gc);
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
}

// A two-term op's backward (see rescale_or_recompute_rows), with its buffers checked: grad as the forward
// wrote it, the incoming per-row gradients fp32 over the row dims.
template <template <typename, typename> class Runner, typename Problem>
void rewrite_two_term_grad(const char* op, at::Tensor& grad, const at::Tensor& grad_kl_rows,
                           const at::Tensor& grad_ce_rows, const Problem& pb, at::ScalarType teacher_dtype) {
  const at::Tensor& student = pb.student;
  check_cpu(op, "grad", grad);
  TORCH_CHECK_TYPE(grad.scalar_type() == student.scalar_type(), op, ": grad must have dtype ", student.scalar_type(),
                   ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == student.sizes() && grad.is_contiguous(), op,
                    ": grad must be contiguous with shape ", student.sizes(), ", got ", grad.sizes(),
                    " with strides ", grad.strides());
  check_rows_tensor(op, "grad_kl_rows", grad_kl_rows, student, at::kFloat);
  check_rows_tensor(op, "grad_ce_rows", grad_ce_rows, student, at::kFloat);
  dispatch_pair(student.scalar_type(), teacher_dtype, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    rescale_or_recompute_rows<Runner<S, decltype(t_tag)>>(grad.data_ptr<S>(), pb, grad_kl_rows, grad_ce_rows,
                                                           pb.kl_coef, pb.ce_coef);
  });
}

}  // namespace distil::cpu
