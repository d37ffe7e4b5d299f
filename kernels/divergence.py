"""The divergences of the KL+CE row kernels other than the forward KL, one per-element place for Triton
(csrc/divergence.h is the CPU twin; distil/_ops/divergence.py defines them for users).

With p = softmax(t/T) the teacher's and q = softmax(s/T) the student's probabilities, a row's loss is
T² Σ_j l_j(p, q), and as dq_i/ds_j = q_i (δ_ij − q_j) / T its gradient is

    d(T² Σ_i l_i)/ds_j = T q_j (a_j − c),   a_i = ∂l_i/∂q_i,   c = Σ_i q_i a_i,

so these divergences take three passes over a row: the maxima and normalisers (every l_j needs both
normalised probabilities), then the loss and c, then the gradient (kernels/kl_ce.py). The forward KL
keeps its two (its loss is an online sum, kernels/kl_ce.py).

Each element comes as (p, q, d), d = log p − log q (+inf where q = 0 < p, −inf where p = 0 < q, NaN
where both are 0, and where a masked chunk reads outside the row). A term of probability 0 is exactly
0, and so is a_j where q_j = 0; an infinite divergence (the reverse KL where p_j = 0 < q_j) is +inf.

Per divergence (the derivations: csrc/divergence.h):
- reverse_kl, KL(q‖p): term = −q d, a = −d;
- jsd, β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q: a = (1 − β) log(q/m);
- skew_kl, KL(p‖r), r = α p + (1 − α) q: term = p log(p/r), a = −(1 − α) p/r;
- skew_reverse_kl, KL(q‖r), r = α q + (1 − α) p: term = q log(q/r), a = log(q/r) − α q/r;
- tvd, ½ Σ|p − q|: a = sign(q − p)/2 with sign(0) = 0 (a subgradient).

Adding a divergence: a branch in :func:`divergence_term` here, its DivergenceTerm in csrc/divergence.h,
its name in distil/_ops/divergence.py and its float64 definition in distil/reference.py.
"""
import triton
import triton.language as tl

from distil.kernels.rows import LOG2E


@triton.jit
def _mixture_ratios(d, wp, wq):
    """log(p/m), log(q/m), p/m, q/m for m = wp p + wq q (wp, wq in (0, 1]): with E = e^-|d|, m/q = wp E + wq
    where p <= q and m/p = wp + wq E where p > q, a number in [min(wp, wq), 1] whose log is well
    conditioned at any d."""
    p_le_q = d <= 0.0
    e = tl.exp2(-tl.abs(d) * LOG2E)
    den = tl.maximum(tl.where(p_le_q, wp * e + wq, wp + wq * e), 1.1754943508222875e-38)
    L = -tl.log(den)
    log_pm = tl.where(p_le_q, d + L, L)
    log_qm = tl.where(p_le_q, L, L - d)
    pm = tl.where(p_le_q, e, 1.0) / den
    qm = tl.where(p_le_q, 1.0, e) / den
    return log_pm, log_qm, pm, qm


@triton.jit
def divergence_term(p, q, d, param, DIVERGENCE: tl.constexpr):
    """(l_j, a_j) of the divergence DIVERGENCE (its parameter ``param``) at elements (p, q, d)."""
    zero = tl.zeros_like(q)
    if DIVERGENCE == "reverse_kl":
        term = tl.where(q > 0.0, -q * d, zero)
        a = tl.where(q > 0.0, -d, zero)
    elif DIVERGENCE == "jsd":
        log_pm, log_qm, _, _ = _mixture_ratios(d, param, 1.0 - param)
        term = tl.where(p > 0.0, param * p * log_pm, zero) + tl.where(q > 0.0, (1.0 - param) * q * log_qm, zero)
        a = tl.where(q > 0.0, (1.0 - param) * log_qm, zero)
    elif DIVERGENCE == "skew_kl":
        log_pm, _, pm, _ = _mixture_ratios(d, param, 1.0 - param)
        term = tl.where(p > 0.0, p * log_pm, zero)
        a = tl.where(q > 0.0, -(1.0 - param) * pm, zero)
    elif DIVERGENCE == "skew_reverse_kl":
        _, log_qm, _, qm = _mixture_ratios(d, 1.0 - param, param)
        term = tl.where(q > 0.0, q * log_qm, zero)
        a = tl.where(q > 0.0, log_qm - param * qm, zero)
    else:
        tl.static_assert(DIVERGENCE == "tvd", "unknown divergence")
        term = 0.5 * tl.abs(p - q)
        a = tl.where(q > p, 0.5, tl.where(q < p, -0.5, zero))
    return term, a
