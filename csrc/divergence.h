// The divergences of the KL+CE row ops (kl_ce.cpp) other than the forward KL, one per-element place:
// DivergenceTerm<D>::loss gives the loss term of element j and DivergenceTerm<D>::dq the derivative a_j
// of the row's loss with respect to the student's probability q_j. kernels/divergence.py is the Triton twin.
//
// With p = softmax(t/T) the teacher's and q = softmax(s/T) the student's probabilities, a row's loss
// is T^2 * sum_j l_j(p, q), and since dq_i/ds_j = q_i (delta_ij - q_j) / T its gradient is
//   d(T^2 sum_i l_i)/ds_j = T q_j (a_j - sum_i q_i a_i),   a_i = dl_i/dq_i,
// so every divergence takes three passes over a row: the maxima and normalisers, then the loss and
// c = sum_i q_i a_i (every l_i needs both normalised probabilities, so it cannot start before the
// first pass ends), then the gradient. (The forward KL, whose loss needs no normalised terms, keeps
// its two passes in kl_ce.cpp.)
//
// Each element is given as (p, q, d) with d = log p - log q (+inf where q = 0 < p, -inf where
// p = 0 < q, NaN where both are 0). A term of probability 0 is exactly 0 (no 0 log 0), and so is its
// a_j where q_j = 0 (it is multiplied by q_j). A divergence that is infinite (the reverse KL where
// p_j = 0 < q_j) gives +inf; its gradient is then not finite.
//
// Adding a divergence: a Divergence value, its DivergenceTerm below (loss and dq), its name in parse_divergence,
// the same in kernels/divergence.py and distil/_ops/divergence.py, and its float64 definition in
// distil/reference.py.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/bit_cast.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "rows.h"

namespace distil::cpu {

enum class Divergence { ForwardKL, ReverseKL, JSD, SkewKL, SkewReverseKL, TVD };

// The divergence named `name` with its parameter (JSD's beta, the skew KLs' alpha: in (0, 1), their
// end points are the plain KLs and are passed as those; 0 for the others).
inline Divergence parse_divergence(const char* op, c10::string_view name, double param) {
  struct Entry {
    const char* name;
    Divergence divergence;
    bool has_param;
  };
  static constexpr Entry kEntries[] = {
      {"forward_kl", Divergence::ForwardKL, false}, {"reverse_kl", Divergence::ReverseKL, false},
      {"jsd", Divergence::JSD, true},               {"skew_kl", Divergence::SkewKL, true},
      {"skew_reverse_kl", Divergence::SkewReverseKL, true}, {"tvd", Divergence::TVD, false},
  };
  for (const Entry& e : kEntries) {
    if (name != e.name) continue;
    if (e.has_param) {
      TORCH_CHECK_VALUE(param > 0 && param < 1, op, ": divergence_param of ", e.name, " must be in (0, 1), got ",
                        param);
    } else {
      TORCH_CHECK_VALUE(param == 0, op, ": ", e.name, " takes no divergence_param, got ", param);
    }
    return e.divergence;
  }
  TORCH_CHECK_VALUE(false, op, ": unknown divergence '", name,
                    "' (forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd)");
}

// log x for a positive normal float: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(z),
// z = (m - 1) / (m + 1), |z| <= 0.172, by its series to z^11 (truncation < 1e-10 relative).
// Branch-free, so that the loops calling it vectorise (std::log does not).
DISTIL_INLINE float log_normal(float x) {
  const int32_t bits = c10::bit_cast<int32_t>(x);
  const int32_t e = (bits - 0x3f3504f3) >> 23;  // 0x3f3504f3: sqrt(1/2)
  const float m = c10::bit_cast<float>(bits - (e << 23));
  const float z = (m - 1.0f) / (m + 1.0f);
  const float z2 = z * z;
  const float series =
      1.0f + z2 * (1.0f / 3.0f + z2 * (1.0f / 5.0f + z2 * (1.0f / 7.0f + z2 * (1.0f / 9.0f + z2 * (1.0f / 11.0f)))));
  return static_cast<float>(e) * 0.693147180559945f + 2.0f * z * series;
}

// m/q where p <= q and m/p where p > q, for the mixture m = wp p + wq q (wp, wq in (0, 1], wp + wq = 1)
// of an element with d = log p - log q: with E = e^-|d|, wp E + wq or wp + wq E, a number in
// [min(wp, wq), 1] whose log is well conditioned at any d (no p/q overflow, no log of an underflowed
// probability). With L = -log(den): log(p/m) = L + min(d, 0), log(q/m) = L - max(d, 0),
// p/m = e^min(d, 0) / den, q/m = e^-max(d, 0) / den.
DISTIL_INLINE float mixture_den(float d, float wp, float wq) {
  const float E = exp_nonpos(-std::abs(d));
  return std::max(d <= 0.0f ? wp * E + wq : wp + wq * E, std::numeric_limits<float>::min());
}

// Per divergence: loss(p, q, d, param), the element's loss term, and dq(p, q, d, param), its a_j. Plain
// scalar functions (no out-parameters or aggregates, which GCC's omp simd would not vectorise); the
// compiler shares what the two compute alike.
template <Divergence D>
struct DivergenceTerm;

// KL(q || p) = sum q log(q/p): l = -q d, a = log(q/p) + 1 (the 1 cancels in a_j - sum q a) = -d.
template <>
struct DivergenceTerm<Divergence::ReverseKL> {
  DISTIL_INLINE static float loss(float, float q, float d, float) { return q > 0.0f ? -q * d : 0.0f; }
  DISTIL_INLINE static float dq(float, float q, float d, float) { return q > 0.0f ? -d : 0.0f; }
};

// beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (TRL's generalized JSD; Liger's
// LigerJSD): a = beta (-p/m)(1 - beta) + (1 - beta)(log(q/m) + 1 - (1 - beta) q/m) = (1 - beta) log(q/m),
// as beta p + (1 - beta) q = m.
template <>
struct DivergenceTerm<Divergence::JSD> {
  DISTIL_INLINE static float loss(float p, float q, float d, float beta) {
    const float L = -log_normal(mixture_den(d, beta, 1.0f - beta));
    return (p > 0.0f ? beta * p * (L + std::min(d, 0.0f)) : 0.0f) +
           (q > 0.0f ? (1.0f - beta) * q * (L - std::max(d, 0.0f)) : 0.0f);
  }
  DISTIL_INLINE static float dq(float, float q, float d, float beta) {
    const float L = -log_normal(mixture_den(d, beta, 1.0f - beta));
    return q > 0.0f ? (1.0f - beta) * (L - std::max(d, 0.0f)) : 0.0f;
  }
};

// KL(p || r), r = alpha p + (1 - alpha) q (DistiLLM's skew KL): a = -(1 - alpha) p / r.
template <>
struct DivergenceTerm<Divergence::SkewKL> {
  DISTIL_INLINE static float loss(float p, float, float d, float alpha) {
    const float L = -log_normal(mixture_den(d, alpha, 1.0f - alpha));
    return p > 0.0f ? p * (L + std::min(d, 0.0f)) : 0.0f;
  }
  DISTIL_INLINE static float dq(float, float q, float d, float alpha) {
    const float den = mixture_den(d, alpha, 1.0f - alpha);
    return q > 0.0f ? -(1.0f - alpha) * exp_nonpos(std::min(d, 0.0f)) / den : 0.0f;
  }
};

// KL(q || r), r = alpha q + (1 - alpha) p (DistiLLM's skew reverse KL):
// a = log(q/r) + 1 - alpha q/r (the 1 cancels).
template <>
struct DivergenceTerm<Divergence::SkewReverseKL> {
  DISTIL_INLINE static float loss(float, float q, float d, float alpha) {
    const float L = -log_normal(mixture_den(d, 1.0f - alpha, alpha));
    return q > 0.0f ? q * (L - std::max(d, 0.0f)) : 0.0f;
  }
  DISTIL_INLINE static float dq(float, float q, float d, float alpha) {
    const float den = mixture_den(d, 1.0f - alpha, alpha);
    const float qr = exp_nonpos(-std::max(d, 0.0f)) / den;
    return q > 0.0f ? (-log_normal(den) - std::max(d, 0.0f)) - alpha * qr : 0.0f;
  }
};

// (1/2) sum |p - q|, not differentiable where p_j = q_j: the subgradient a = sign(q - p) / 2 with
// sign(0) = 0 (Liger's TVD takes -1/2 there, on the probabilities).
template <>
struct DivergenceTerm<Divergence::TVD> {
  DISTIL_INLINE static float loss(float p, float q, float, float) { return 0.5f * std::abs(p - q); }
  DISTIL_INLINE static float dq(float p, float q, float, float) { return q > p ? 0.5f : (q < p ? -0.5f : 0.0f); }
};

}  // namespace distil::cpu
