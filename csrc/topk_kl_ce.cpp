// distil::topk_kl_ce_rows and distil::topk_kl_ce_rows_backward: schemas and CPU kernels.  The
// contract (both teacher modes, their formulas and gradients, the tail floor, the -inf policy) is
// the docstring of kernels/topk_kl_ce.py, the CUDA twin; this file follows it line by line.
//
// One thread handles whole rows (at::parallel_for).  Per row: one read of the student row for its
// maximum and two exp-sums (at T and at 1, blockwise online, keeping the exponentials for the
// gradient, the KL ones in the gradient buffer itself), then the k teacher entries with the
// student's values at their indices, then the gradient: dense over V from the kept exponentials,
// plus a correction at the k indices.  Invalid indices (outside [0, V), or repeated within a row) raise;
// only rows whose KL term is used read their indices.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
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

TORCH_LIBRARY_FRAGMENT(distil, m) {
  // KL against a teacher known by its top-k logits (teacher_values, at teacher_index) + CE, per row
  // of [N, V] / [B, S, V] student logits; teacher_values / teacher_index are [N, k] / [B, S, k].
  // Without teacher_lse the teacher is the softmax of its k logits at T; with it (the teacher's
  // full-vocabulary logsumexp of t/T, fp32 over the row dims) the teacher is exp(t/T - lse) on the
  // k entries plus one tail bucket.  Outputs as kl_ce_rows.
  m.def(
      "topk_kl_ce_rows(Tensor student, Tensor teacher_values, Tensor teacher_index, Tensor? teacher_lse, "
      "Tensor? labels, Tensor? kl_mask, Tensor coef, float temperature, int ignore_index, bool compute_grad, "
      "str divergence=\"forward_kl\", float divergence_param=0.0) -> (Tensor, Tensor, Tensor)");
  // Rewrites the forward's grad (made for coef) in place into the gradient for the incoming per-row
  // gradients, as kl_ce_rows_backward.
  m.def(
      "topk_kl_ce_rows_backward(Tensor(a!) grad, Tensor grad_kl_rows, Tensor grad_ce_rows, Tensor student, "
      "Tensor teacher_values, Tensor teacher_index, Tensor? teacher_lse, Tensor? labels, Tensor? kl_mask, "
      "Tensor coef, float temperature, int ignore_index, str divergence=\"forward_kl\", "
      "float divergence_param=0.0) -> ()");
}

namespace distil::cpu {
namespace {

using at::Tensor;

constexpr const char* kOp = "topk_kl_ce_rows";
// Both tail masses are floored at 2^-16 (kernels/topk_kl_ce.py, TAIL_FLOOR): below it they are
// rounding noise of fp32 sums of probabilities.
constexpr float kTailFloor = 1.52587890625e-05f;
// The teacher's tail mass 1 - e^(lse_K - lse) is noise below |lse| 2^-21 (4 ulps of the fp32 lse).
constexpr float kLseResolution = 4.76837158203125e-07f;

// One row's teacher: k fp32 logits and their (validated) indices; lse is NaN-free only in exact mode.
struct TeacherRow {
  const float* t;
  const int64_t* idx;
  int64_t k;
  bool exact;
  float lse;
};

// The student row is read once: per block of kBlock logits (L1-resident) its maximum, then the
// exponentials relative to it, folded into running sums; the gradient pass rescales each block by
// its own factor.  (The separate max pass of kl_ce.cpp would re-read the row.)
constexpr int64_t kBlock = 2048;

struct StudentStats {
  float ms = kNegInf;  // row maximum
  float zs = 0.f;      // sum_i e^{(s_i - ms)/T}
  float z1 = 0.f;      // sum_i e^{s_i - ms}
};

// With STORE, es[i] = e^{(s_i - bm)/T} and e1[i] = e^{s_i - bm} (bm: the block's maximum, kept in bmax).
template <bool KL, bool CE, bool STORE>
DISTIL_INLINE StudentStats student_pass(const float* s, int64_t V, float inv_t, float* es, float* e1, float* bmax) {
  StudentStats st;
  for (int64_t b = 0, off = 0; off < V; ++b, off += kBlock) {
    const int64_t n = std::min(kBlock, V - off);
    const float* x = s + off;
    const float bm = row_max(x, n);
    bmax[b] = bm;
    float za = 0.f, zc = 0.f;
    const float m = bm == kNegInf ? 0.f : bm;  // an all -inf block stores zeros
#pragma omp simd reduction(+ : za, zc)
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[j] - m;
      if constexpr (KL) {
        const float u = exp_nonpos(d * inv_t);
        za += u;
        if constexpr (STORE) es[off + j] = u;
      }
      if constexpr (CE) {
        const float w = exp_nonpos(d);
        zc += w;
        if constexpr (STORE) e1[off + j] = w;
      }
    }
    if (bm == kNegInf) continue;
    // Rescale the running sums to the new maximum (e^{-inf} = 0 on the first block). A NaN block
    // maximum (row_max: the block holds a NaN) takes this branch too, so the sums become NaN.
    if (!(bm <= st.ms)) {
      st.zs = st.zs * std::exp((st.ms - bm) * inv_t) + za;
      st.z1 = st.z1 * std::exp(st.ms - bm) + zc;
      st.ms = bm;
    } else {
      st.zs += za * std::exp((bm - st.ms) * inv_t);
      st.z1 += zc * std::exp(bm - st.ms);
    }
  }
  return st;
}

// g = ca p + ce_coef P from the stored block exponentials (es may alias g).
template <bool KL, bool CE>
DISTIL_INLINE void dense_grad(float* g, const float* es, const float* e1, const float* bmax, int64_t V, float inv_t,
                              const StudentStats& st, float ca, float ce_coef) {
  for (int64_t b = 0, off = 0; off < V; ++b, off += kBlock) {
    const int64_t n = std::min(kBlock, V - off);
    const float shift = bmax[b] - st.ms;  // -inf for an all -inf block: its factors are 0
    const float fa = KL ? ca / st.zs * std::exp(shift * inv_t) : 0.f;
    const float f1 = CE ? ce_coef / st.z1 * std::exp(shift) : 0.f;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float x = 0.f;
      if constexpr (KL) x = fa * es[off + j];
      if constexpr (CE) x += f1 * e1[off + j];
      g[off + j] = x;
    }
  }
}

// The KL part of a row: its loss and alpha (the dense gradient's coefficient).
struct TopkTerms {
  float kl;
  float alpha;
};

// r (e^z - 1 - z) with r e^z = u c: without cancellation for |z| <= 1/4 (Taylor to z^6, truncation
// < 1e-8 relative), else from u (no exponent built of several rounded logs).
DISTIL_INLINE float weighted_expm1_minus(float r, float u, float c, float z) {
  if (std::abs(z) <= 0.25f) {
    return r * z * z * (0.5f + z * (1.0f / 6.0f + z * (1.0f / 24.0f + z * (1.0f / 120.0f + z * (1.0f / 720.0f)))));
  }
  return u * c - r - r * z;
}

// Exact mode: the teacher's mass outside K, 1 - e^gap with gap = lse_K - lse (lse_K = scaled_max + log_zt),
// resolved only above the rounding of the given fp32 lse (~|lse| 2^-23 per ulp); below that (and in the
// renormalised mode) the tail is 0 and the teacher on K the softmax of the k logits.
struct TeacherTail {
  float mass = 0.f;
  float gap = 0.f;  // log of the mass on K
};

DISTIL_INLINE TeacherTail teacher_tail(const TeacherRow& tr, float scaled_max, float log_zt) {
  if (!tr.exact) return {};
  const float g = (scaled_max - tr.lse) + log_zt;
  const float tail = -std::expm1(g);
  if (tail <= std::max(kTailFloor, std::abs(tr.lse) * kLseResolution)) return {};  // a NaN lse stays NaN
  return {tail, g};
}

// The KL part of a row from the student's (ms, zs): its loss, the coefficient alpha of the dense
// gradient term, and per entry T (beta p_j - q_j) in qg for the corrections at the indices (the
// module docstring of kernels/topk_kl_ce.py has the formulas).  Every exponent is a logit difference
// before it is scaled by 1/T (exact at large logits), and the KL over K is
//   log(1 + sum_K r_j (e^z_j - 1 - z_j) + e^-wbar rest / zt),  w_j = ds_j - dt_j, z_j = w_j - wbar,
// a sum of nonnegative terms (sum_K r z = 0 drops out): no cancellation at large T, where each log
// probability is O(1/T) and the KL O(1/T^2).
DISTIL_INLINE TopkTerms topk_terms(const float* s, int64_t V, const StudentStats& st, float T, const TeacherRow& tr,
                                   float* qg) {
  const float inv_t = 1.0f / T;
  const float mt = row_max(tr.t, tr.k);
  const float m = mt == kNegInf ? 0.f : mt;  // all k logits -inf (exact mode): q = 0, the tail holds it all
  // k-long sums in double: a rounding of wbar is an error of the KL itself.
  double zt_sum = 0.0, u_sum = 0.0, vw = 0.0;
  float* u = qg + tr.k;
  for (int64_t j = 0; j < tr.k; ++j) {
    const float dt = (tr.t[j] - m) * inv_t;
    const float v = std::exp(dt);
    u[j] = std::exp((s[tr.idx[j]] - st.ms) * inv_t);
    qg[j] = v;
    zt_sum += v;
    u_sum += u[j];
    vw += v > 0.f ? v * (((s[tr.idx[j]] - st.ms) - (tr.t[j] - m)) * inv_t) : 0.f;  // r_j = 0 contributes 0
  }
  const float zt = static_cast<float>(zt_sum), sum_u = static_cast<float>(u_sum);
  const float log_zt = std::log(zt);
  const float wbar = static_cast<float>(vw / zt_sum);
  const float c = std::exp(-wbar - log_zt);  // r_j e^z_j = u_j c
  double a_sum = 0.0;
  for (int64_t j = 0; j < tr.k; ++j) {
    if (!(qg[j] > 0.f)) continue;
    const float w = ((s[tr.idx[j]] - st.ms) - (tr.t[j] - m)) * inv_t;
    a_sum += weighted_expm1_minus(qg[j] / zt, u[j], c, w - wbar);
  }
  const float a = static_cast<float>(a_sum);
  // The student's mass outside K (none with k = V), as log(e^-wbar rest / zt).
  const float rest = tr.k == V ? 0.f : std::max(st.zs - sum_u, 0.f);
  const float lb = std::log(rest) - log_zt - wbar;
  float kl_k = lb > 0.f ? lb + std::log1p((1.0f + a) * std::exp(-lb)) : std::log1p(a + std::exp(lb));
  if (wbar == kNegInf) kl_k = std::numeric_limits<float>::infinity();  // the student is -inf where r > 0
  const auto [q_tail, gap] = teacher_tail(tr, m * inv_t, log_zt);
  const float big_q = 1.0f - q_tail;
  // Sum_K q (log q - log p) = Q (kl_k + log Q), log Q = gap.
  float kl = zt > 0.f ? big_q * (kl_k + gap) : 0.f;
  float beta = 0.f;
  const float big_p = sum_u / st.zs;
  if (q_tail > 0.f) {
    const float p_raw = rest / st.zs;
    const float p_tail = std::max(p_raw, kTailFloor);
    kl += q_tail * (std::log(q_tail) - std::log(p_tail));
    beta = p_raw > kTailFloor ? q_tail / p_tail : 0.f;  // a floored tail has no gradient
  }
  const float q_scale = zt > 0.f ? big_q / zt : 0.f, p_scale = 1.0f / st.zs;
  for (int64_t j = 0; j < tr.k; ++j) qg[j] = T * (beta * p_scale * u[j] - q_scale * qg[j]);
  return {std::max(T * T * kl, 0.f), big_q - beta * big_p};  // never below 0 (rounding); NaN stays
}

// The other divergences (divergence.h) on the buckets: the k tokens, with teacher p_j = Q r_j and student
// q_j = pi_{i_j} (pi = softmax(s/T) over the vocabulary), and in exact mode the tail, teacher q_tail's
// mass against the student's rest.  With a_b = dl_b/dq_b and c = sum_b q_b a_b the gradient is
// T pi_i (a_{b(i)} - c), b(i) the bucket of token i (a = 0 outside K in the renormalised mode): a dense
// term alpha = a_tail - c and corrections T q_j (a_j - a_tail) at the indices, left in qg.
template <Divergence D>
DISTIL_INLINE TopkTerms divergence_terms(const float* s, int64_t V, const StudentStats& st, float T, float param,
                                         const TeacherRow& tr, float* qg) {
  const float inv_t = 1.0f / T;
  const float mt = row_max(tr.t, tr.k);
  const float m = mt == kNegInf ? 0.f : mt;
  double zt_sum = 0.0, u_sum = 0.0;
  for (int64_t j = 0; j < tr.k; ++j) {
    zt_sum += std::exp((tr.t[j] - m) * inv_t);
    u_sum += std::exp((s[tr.idx[j]] - st.ms) * inv_t);
  }
  const float zt = static_cast<float>(zt_sum), log_zt = std::log(zt), log_zs = std::log(st.zs);
  const auto [q_tail, gap] = teacher_tail(tr, m * inv_t, log_zt);
  // The reverse KLs' a_j drop a constant 1 that cancels in a_j - c over buckets of mass 1; the renormalised
  // mode's student buckets (the k tokens) have less, so it is added back there.
  constexpr bool kReverse = D == Divergence::ReverseKL || D == Divergence::SkewReverseKL;
  const float a_shift = kReverse && !tr.exact ? 1.f : 0.f;
  float loss = 0.f, c = 0.f;
  for (int64_t j = 0; j < tr.k; ++j) {
    // No finite k logit (exact mode: the tail holds it all): p_j = 0, and d = -inf where q_j > 0.
    const float lp = zt > 0.f ? (tr.t[j] - m) * inv_t - log_zt + gap : kNegInf;
    const float lq = (s[tr.idx[j]] - st.ms) * inv_t - log_zs;
    const float p = std::exp(lp), q = std::exp(lq);
    const float d = lp - lq;
    const float a = DivergenceTerm<D>::dq(p, q, d, param) + a_shift;
    loss += DivergenceTerm<D>::loss(p, q, d, param);
    c += q * a;
    qg[j] = a;
    qg[tr.k + j] = q;
  }
  float a_tail = 0.f;
  if (tr.exact) {
    const float rest = tr.k == V ? 0.f : std::max(st.zs - static_cast<float>(u_sum), 0.f);
    const float q = rest / st.zs;
    const float d = std::log(q_tail) - std::log(q);
    a_tail = DivergenceTerm<D>::dq(q_tail, q, d, param);
    loss += DivergenceTerm<D>::loss(q_tail, q, d, param);
    c += q * a_tail;
  }
  for (int64_t j = 0; j < tr.k; ++j) qg[j] = T * qg[tr.k + j] * (qg[j] - a_tail);
  // Never below 0 (rounding; NaN stays) where it is a divergence: in exact mode, and in the renormalised
  // one except for the reverse KLs, whose student side (mass sum_K q < 1) makes them negative at times.
  const bool nonneg = tr.exact || !kReverse;
  // A NaN on either side makes the row NaN (the terms' q > 0 / p > 0 guards would drop it), as kl_ce_rows.
  if (std::isnan(st.zs) || std::isnan(zt) || std::isnan(tr.lse)) return {kNaN, kNaN};
  return {nonneg ? std::max(T * T * loss, 0.f) : T * T * loss, a_tail - c};
}

// The divergence's terms of a row with a KL part.
DISTIL_INLINE TopkTerms row_terms(Divergence divergence, float param, const float* s, int64_t V,
                                  const StudentStats& st, float T, const TeacherRow& tr, float* qg) {
  switch (divergence) {
    case Divergence::ForwardKL:
      return topk_terms(s, V, st, T, tr, qg);
    case Divergence::ReverseKL:
      return divergence_terms<Divergence::ReverseKL>(s, V, st, T, param, tr, qg);
    case Divergence::JSD:
      return divergence_terms<Divergence::JSD>(s, V, st, T, param, tr, qg);
    case Divergence::SkewKL:
      return divergence_terms<Divergence::SkewKL>(s, V, st, T, param, tr, qg);
    case Divergence::SkewReverseKL:
      return divergence_terms<Divergence::SkewReverseKL>(s, V, st, T, param, tr, qg);
    case Divergence::TVD:
      return divergence_terms<Divergence::TVD>(s, V, st, T, param, tr, qg);
  }
  return {0.f, 0.f};
}

// Losses of one fp32 row and, when g is given, the gradient job.kl_coef * dKL + job.ce_coef * dCE (zeros where
// neither applies; g doubles as the store of the KL exponentials).  scratch holds V + 2 k + V / kBlock + 1 floats.
DISTIL_CLONES RowLoss topk_kl_ce_row(const float* s, int64_t V, const TeacherRow& tr, float T, Divergence divergence,
                                     float param, const RowJob& job, float* g, float* scratch) {
  float* e1 = scratch;
  float* qg = scratch + V;
  float* bmax = qg + 2 * tr.k;
  const float inv_t = 1.0f / T;
  // A row that is -inf everywhere (student; teacher's k logits or lse) has loss 0 and gradient 0.
  const bool want_kl = job.kl && (tr.exact ? tr.lse != kNegInf : row_max(tr.t, tr.k) != kNegInf);
  const bool want_ce = job.label >= 0;
  StudentStats st;
  if (want_kl && want_ce) {
    st = g ? student_pass<true, true, true>(s, V, inv_t, g, e1, bmax) : student_pass<true, true, false>(s, V, inv_t, g, e1, bmax);
  } else if (want_kl) {
    st = g ? student_pass<true, false, true>(s, V, inv_t, g, e1, bmax) : student_pass<true, false, false>(s, V, inv_t, g, e1, bmax);
  } else if (want_ce) {
    st = g ? student_pass<false, true, true>(s, V, inv_t, g, e1, bmax) : student_pass<false, true, false>(s, V, inv_t, g, e1, bmax);
  }
  const bool kl = want_kl && st.ms != kNegInf;
  const bool ce = want_ce && st.ms != kNegInf;
  RowLoss out;
  TopkTerms terms{0.f, 0.f};
  if (kl) {
    terms = row_terms(divergence, param, s, V, st, T, tr, qg);
    out.kl = terms.kl;
  }
  if (ce) out.ce = std::log(st.z1) + (st.ms - s[job.label]);  // the difference first: exact at large logits
  if (!g) return out;
  // d kl/ds_i = T (alpha p_i + [i in K] (beta p_i - q_i)); d ce/ds = P - onehot(y).
  const float ca = job.kl_coef * T * terms.alpha, ce_coef = job.ce_coef;
  if (kl && ce) {
    dense_grad<true, true>(g, g, e1, bmax, V, inv_t, st, ca, ce_coef);
  } else if (kl) {
    dense_grad<true, false>(g, g, e1, bmax, V, inv_t, st, ca, ce_coef);
  } else if (ce) {
    dense_grad<false, true>(g, g, e1, bmax, V, inv_t, st, ca, ce_coef);
  } else {
    std::fill(g, g + V, 0.f);
  }
  if (ce) g[job.label] -= job.ce_coef;
  if (kl) {
    for (int64_t j = 0; j < tr.k; ++j) g[tr.idx[j]] += job.kl_coef * qg[j];
  }
  return out;
}

// The arguments both ops share, checked: TwoTermArgs (rows.h), the top-k teacher and the divergence.
struct Problem : TwoTermArgs {
  const Tensor& values;
  const Tensor& index;
  std::optional<RowValues<float>> lse;
  RowOffsets index_off;
  Divergence divergence;
  float divergence_param;
  int64_t k;

  Problem(const Tensor& student_, const Tensor& values_, const Tensor& index_, const std::optional<Tensor>& lse_,
          const std::optional<Tensor>& labels_, const std::optional<Tensor>& kl_mask_, const Tensor& coef,
          double temperature, int64_t ignore_index_, c10::string_view divergence_, double divergence_param_)
      : TwoTermArgs(kOp, student_, labels_, kl_mask_, coef, temperature, ignore_index_),
        values(values_),
        index(index_),
        divergence(parse_divergence(kOp, divergence_, divergence_param_)),
        divergence_param(static_cast<float>(divergence_param_)) {
    check_float_rows(kOp, "teacher_values", values);
    const int64_t row_dims = student.dim() - 1;
    const auto rows = student.sizes().slice(0, row_dims);
    TORCH_CHECK_VALUE(values.dim() == student.dim() && values.sizes().slice(0, row_dims) == rows, kOp,
                      ": teacher_values has shape ", values.sizes(), " but the student's rows are ", rows);
    check_cpu(kOp, "teacher_index", index);
    TORCH_CHECK_TYPE(index.scalar_type() == at::kShort || index.scalar_type() == at::kInt ||
                         index.scalar_type() == at::kLong,
                     kOp, ": teacher_index must be int16, int32 or int64, got ", index.scalar_type());
    TORCH_CHECK_VALUE(index.sizes() == values.sizes(), kOp, ": teacher_index has shape ", index.sizes(),
                      " but teacher_values has shape ", values.sizes());
    TORCH_CHECK_VALUE(index.size(-1) <= 1 || index.stride(-1) == 1, kOp,
                      ": teacher_index must have a unit stride in its last dim, got strides ", index.strides());
    index_off = row_offsets(index, row_dims);
    if (lse_) {
      check_rows_tensor(kOp, "teacher_lse", *lse_, student, at::kFloat);
      lse = row_values<float>(*lse_, row_dims);
    }
    k = values.size(-1);
  }
};

// Per-thread row evaluator: fp32 copies of narrower rows, the row's validated indices, scratch.
template <typename S, typename Tt>
class RowRunner {
 public:
  explicit RowRunner(const Problem& pb)
      : pb_(pb),
        s_(row_values<S>(pb.student, pb.student.dim() - 1)),
        t_(row_values<Tt>(pb.values, pb.values.dim() - 1)),
        buf_((1 + 2 * !std::is_same_v<S, float>) * pb.V + 3 * pb.k + pb.V / kBlock + 1),
        idx_(pb.k),
        seen_(pb.V, 0) {}

  RowLoss run(int64_t r, const RowJob& job, S* g) {
    const int64_t V = pb_.V, k = pb_.k;
    float* const scratch = buf_.data();  // V + 2 k + blocks, then k teacher values, then the narrow-dtype rows
    float* const tf = scratch + V + 2 * k + V / kBlock + 1;
    const auto [sf, gf] = fp32_student_row(s_.data + s_.off(r), g, tf + k, V);
    TeacherRow tr{tf, idx_.data(), k, pb_.lse.has_value(), pb_.lse ? (*pb_.lse)[r] : 0.f};
    if (job.kl) {
      load_row(tf, t_.data + t_.off(r), k);
      read_indices(r);
    }
    const RowLoss loss =
        topk_kl_ce_row(sf, V, tr, pb_.temperature, pb_.divergence, pb_.divergence_param, job, gf, scratch);
    store_student_grad(g, gf, V);
    return loss;
  }

 private:
  // Row r's indices as int64, each checked in [0, V) and unique within the row.
  void read_indices(int64_t r) {
    const int64_t off = pb_.index_off(r);
    switch (pb_.index.scalar_type()) {
      case at::kShort:
        std::copy_n(pb_.index.const_data_ptr<int16_t>() + off, pb_.k, idx_.begin());
        break;
      case at::kInt:
        std::copy_n(pb_.index.const_data_ptr<int32_t>() + off, pb_.k, idx_.begin());
        break;
      default:
        std::copy_n(pb_.index.const_data_ptr<int64_t>() + off, pb_.k, idx_.begin());
    }
    int64_t bad = 0;
    bool outside = false, repeated = false;
    for (int64_t j = 0; j < pb_.k && !outside && !repeated; ++j) {
      bad = idx_[j];
      outside = bad < 0 || bad >= pb_.V;
      repeated = !outside && seen_[bad];
      if (!outside) seen_[bad] = 1;
    }
    for (int64_t j = 0; j < pb_.k; ++j) {
      if (idx_[j] >= 0 && idx_[j] < pb_.V) seen_[idx_[j]] = 0;
    }
    TORCH_CHECK_VALUE(!outside, kOp, ": teacher_index ", bad, " of row ", r, " is outside [0, ", pb_.V, ")");
    TORCH_CHECK_VALUE(!repeated, kOp, ": teacher_index ", bad, " appears twice in row ", r);
  }

  const Problem& pb_;
  RowValues<S> s_;
  RowValues<Tt> t_;
  std::vector<float> buf_;
  std::vector<int64_t> idx_;
  std::vector<uint8_t> seen_;  // membership of the current row's indices, cleared after each row
};

std::tuple<Tensor, Tensor, Tensor> topk_kl_ce_rows_cpu(const Tensor& student, const Tensor& values,
                                                       const Tensor& index, const std::optional<Tensor>& lse,
                                                       const std::optional<Tensor>& labels,
                                                       const std::optional<Tensor>& kl_mask, const Tensor& coef,
                                                       double temperature, int64_t ignore_index, bool compute_grad,
                                                       c10::string_view divergence, double divergence_param) {
  const Problem pb(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, divergence,
                   divergence_param);
  auto [kl_rows, ce_rows, grad] = two_term_outputs(student, compute_grad);
  fill_two_term_rows<RowRunner>(pb, values.scalar_type(), kl_rows.data_ptr<float>(), ce_rows.data_ptr<float>(),
                                compute_grad ? grad.data_ptr() : nullptr);
  return {kl_rows, ce_rows, grad};
}

void topk_kl_ce_rows_backward_cpu(Tensor& grad, const Tensor& grad_kl_rows, const Tensor& grad_ce_rows,
                                  const Tensor& student, const Tensor& values, const Tensor& index,
                                  const std::optional<Tensor>& lse, const std::optional<Tensor>& labels,
                                  const std::optional<Tensor>& kl_mask, const Tensor& coef, double temperature,
                                  int64_t ignore_index, c10::string_view divergence, double divergence_param) {
  const Problem pb(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, divergence,
                   divergence_param);
  rewrite_two_term_grad<RowRunner>("topk_kl_ce_rows_backward", grad, grad_kl_rows, grad_ce_rows, pb,
                                   values.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(distil, CPU, m) {
  m.impl("topk_kl_ce_rows", &topk_kl_ce_rows_cpu);
  m.impl("topk_kl_ce_rows_backward", &topk_kl_ce_rows_backward_cpu);
}

}  // namespace distil::cpu
