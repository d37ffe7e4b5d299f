"""Temperature KL against a teacher known only by its top-k logits, + cross-entropy, gradient in the forward.

One program per row r of student logits s ([N, V] or [B, S, V], the row convention of
kernels/rows.py) with the teacher's k largest logits t_j at vocabulary indices i_j (``[..., k]``
values and indices, any float / int16 / int32 / int64 dtypes). K = {i_1..i_k}; with
p = softmax(s/T) over the full vocabulary and P = softmax(s), all math in fp32:

Renormalised mode (no ``teacher_lse``; the TRL / DistillKit convention): the teacher is the softmax
of its k logits, q_j = exp(t_j/T) / sum_K exp(t_l/T), against the student's full-vocabulary
log-softmax taken at those indices:

    kl_rows[r] = T^2 * sum_K q_j (log q_j - log p_{i_j})
    d kl_rows / d s_i = T * (Q p_i - [i = i_j] q_j),          Q = sum_K q_j (= 1)

Exact mode (``teacher_lse`` = the teacher's full-vocabulary logsumexp of t/T, natural log, fp32):
the teacher's true top-k probabilities plus one tail bucket holding the rest of its mass, against the
student's mass on the same k tokens and on the rest. The tail is q_tail = 1 - exp(lse_K - lse), lse_K the
logsumexp of the k logits t/T; it is 0 where it is at most max(F, |lse| 2^-21) (below the rounding of an
fp32 lse and of the k-logit sums: then this is the renormalised mode), and then q_j = (1 - q_tail) r_j with
r_j = softmax over K of t/T (the teacher's mass on K, shared in the ratios of its logits):

    Q = 1 - q_tail,  P_K = sum_K p_{i_j},  p_tail = max(1 - P_K, F)
    kl_rows[r] = T^2 * (sum_K q_j (log q_j - log p_{i_j}) + q_tail (log q_tail - log p_tail))
    d kl_rows / d s_i = T * (alpha p_i + [i = i_j] (beta p_i - q_j)),
        beta = q_tail / p_tail (0 when q_tail = 0 or p_tail is floored),  alpha = Q - beta P_K

i.e. T (p - q~) where q~ is q on K and beta p outside K: the tail mass is spread over the other
tokens in the student's proportions. With k = V the tail is rounding noise, beta = 0, and this is the
dense ``kl_ce_rows`` KL. F = TAIL_FLOOR = 2^-16: an fp32 sum of probabilities cannot resolve a tail below
it. The renormalised mode is the same with q_tail = 0.

Precision: every exponent is a logit difference taken before the 1/T scaling ((s - max s) / T,
(t - max t) / T: exact at logits of 1e6), and with w_j = (s_{i_j} - max s) / T - (t_j - max t) / T,
zs / zt the student's / the k teacher logits' exp-sums at those references, wbar = sum_K r w,
z = w - wbar, the KL over K is

    sum_K r_j (log r_j - log p_{i_j}) = log(1 + sum_K r_j (e^z_j - 1 - z_j) + e^-wbar rest / zt)

(sum_K r z = 0; rest = the student's exp-sum outside K, 0 at k = V): a log1p of nonnegative terms, so
no cancellation at large T, where each log probability is O(1/T) and the KL O(1/T^2) (the dense
kernel's PRECISE_KL), and never negative; the row's KL is clamped at 0 against rounding (NaN stays).
At k < V, rest = zs - sum_K u_j is a difference: at huge T with k close to V it is only as exact as zs.

Both modes: ``ce_rows[r] = logsumexp(s_r) - s_r[y_r]`` where y_r != ignore_index, the gradient
``grad[r] = kl_coef * d kl_rows/ds + ce_coef * (P - onehot(y_r))`` (terms of rows outside kl_mask /
without a label dropped), and rows with neither term get loss 0 and a zero gradient row.
This is ``nn.KLDivLoss`` over the k (+ tail) entries, and exactly the dense loss of
``distil.fused_loss.kl_ce_loss`` when k = V in exact mode; the float64 references are
``distil.reference.topk_kl_ce_rows``.

Divergences: the constexpr DIVERGENCE replaces the forward KL by another divergence of kernels/divergence.py
(``divergence_param`` its beta / alpha), taken on the buckets (csrc/topk_kl_ce.cpp's divergence_terms, the
reference ``distil.reference.topk_divergence_rows``): the k tokens, with the teacher's Q r_j against the
student's pi_{i_j} (pi = softmax(s/T) over the vocabulary), and in the exact mode the tail bucket, the
teacher's q_tail against the student's mass outside K (unfloored, 0 at k = V: the dense divergence). With
a_b = dl_b/dq_b and c = sum_b q_b a_b the gradient is T pi_i (a_{b(i)} - c), b(i) the bucket of token i: a
dense T (a_tail - c) pi (a_tail = 0 in the renormalised mode) and T pi_i (a_j - c) at the indices. Every
divergence takes the forward KL's passes: two over the student row (statistics; gradient) and four over the k
entries (their maximum; their exp-sums; the loss and c, where the forward KL sums its log1p terms; the
gradient entries): the terms need both normalisers, but those of the vocabulary come from the first pass.
In the renormalised mode the student's k buckets hold less than its whole mass: the reverse KLs keep the
constant 1 of their a_j (it cancels in a_j - c only over a whole distribution) and are not clamped at 0
(they can be negative there). A teacher with no finite k logit (exact mode) has p_j = 0 on K.

-inf policy: as kl_ce_rows. A -inf teacher logit among the k is an entry with q_j = 0 (it still
belongs to K); a row whose student is -inf everywhere, or whose teacher is (all k logits -inf in the
renormalised mode, lse = -inf in the exact mode), has KL 0 and no KL gradient; a -inf student logit
at an index with q_j > 0 gives +inf.

Indices: each must be in [0, V) and appear once per row. The CPU kernel (csrc/topk_kl_ce.cpp)
raises otherwise; this CUDA kernel does not check (a check would cost a sort per row): an index
outside [0, V) is never read or written (its p_j counts as 0), and a repeated index gives an
undefined gradient at that token. Only rows whose KL term is used read their indices.

Traffic model (bytes per row, e = student element size, e_t / e_i = teacher value / index sizes):
the statistics pass reads s once (online log-sum-exp at T and at 1), the k entries read t, i and
gather s at i (L1/L2 hits after the first pass), the gradient pass re-reads s (L2 while the rows of
the resident programs fit, as kl_ce) and writes grad once, then rewrites the k gradient entries:
2 * V * e + k * (e_t + e_i) from DRAM, against 3 * V * e for the dense kl_ce_rows.
Memory instructions: the student row and the gradient stream as ``aligned_row`` chunks of
kernels/rows.py (a masked head and tail, a 128-bit interior at any V and row stride; chunks of 2048
over 256 threads: 8 elements per thread and chunk, one v4 access in bf16 / fp16, two in fp32); the k
teacher entries and the gradient scatter at their indices are scalar (a gather: k of them per row).

The backward kernel, as kl_ce's: nothing when the incoming per-row gradients equal coef, a per-row
scale when proportional, an exact recomputation otherwise.
"""
import triton
import triton.language as tl

from distil.kernels.divergence import divergence_term
from distil.kernels.rows import (
    LN2,
    LOG2E,
    aligned_row,
    chunk_cols,
    exp2_difference,
    fill_row,
    load_chunk,
    log1p,
    online_scaled_lse_update,
    rescale_factor,
    row_flags,
    row_geometry,
    row_split,
    row_start,
    store_chunk,
    tuning_for,
    vector_width,
)

TAIL_FLOOR: tl.constexpr = tl.constexpr(2.0**-16)
# The teacher's tail mass 1 - e^(lse_K - lse) is noise below |lse| 2^-21 (4 ulps of the fp32 lse).
LSE_RESOLUTION: tl.constexpr = tl.constexpr(2.0**-21)
# Teacher entries per block: k up to this is one block, larger k is streamed in blocks of it.
MAX_BLOCK_K = 128
# Register cap of every launch. Left to choose, ptxas trades a small spill (4 bytes, outside the loops) for
# one more resident program at 32-48 registers; a cap turns that off. 64 keeps four programs of 8 warps per
# SM, and every specialisation spill-free on Triton 3.6 and 3.8, the divergences' included (their terms run in the
# k-entry loops, beside no streamed chunk: 48-64 registers; tests/test_ops.py, tests/test_divergences.py).
MAXNREG = 64


@triton.jit
def _stats_chunk(s_vec, k, h, V, scale_t, m_a, d_a, m_c, d_c, USE_KL, USE_CE, MASKED: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    s = load_chunk(s_vec, k, h, V, float("-inf"), MASKED, BLOCK_V)
    if USE_KL:
        m_a, _ma_ref, d_a, _ea = online_scaled_lse_update(m_a, d_a, s, scale_t)
    if USE_CE:
        m_c, _mc_ref, d_c, _ec = online_scaled_lse_update(m_c, d_c, s, LOG2E)
    return m_a, d_a, m_c, d_c


@triton.jit
def _student_stats(s_vec, h, n, V, scale_t, USE_KL, USE_CE, BLOCK_V: tl.constexpr):
    """One streamed read of a student ``aligned_row`` (128-bit interior, then the masked tail and head, so that
    nothing of the masked chunks stays live across a loop: see kl_ce._row_stats): (m_a, z_a, m_c, z_c), the
    row maximum in logit units (-inf for a row -inf everywhere) and z_a = sum exp2((s - m_a) log2e / T),
    z_c = sum exp(s - m_c): every exponent is a difference before it is scaled (exact at large logits)."""
    zero = tl.full((), 0.0, tl.float32)
    m_a = zero + float("-inf")
    m_c = zero + float("-inf")
    d_a = zero
    d_c = zero
    for k in range(1, n - 1):
        m_a, d_a, m_c, d_c = _stats_chunk(s_vec, k, h, V, scale_t, m_a, d_a, m_c, d_c, USE_KL, USE_CE, False,
                                          BLOCK_V)
    if n > 1:
        m_a, d_a, m_c, d_c = _stats_chunk(s_vec, n - 1, h, V, scale_t, m_a, d_a, m_c, d_c, USE_KL, USE_CE, True,
                                          BLOCK_V)
    m_a, d_a, m_c, d_c = _stats_chunk(s_vec, 0, h, V, scale_t, m_a, d_a, m_c, d_c, USE_KL, USE_CE, True, BLOCK_V)
    return m_a, d_a, m_c, d_c


@triton.jit
def _teacher_block(s_row, t_row, i_row, j0, K, V, BLOCK_K: tl.constexpr):
    """Entries j0 .. j0 + BLOCK_K of the row: (t, s[i], i, in range); t = -inf past k, s = 0 where i is
    outside [0, V) (never read; P_K leaves it out)."""
    j = j0 + tl.arange(0, BLOCK_K)
    valid = j < K
    idx = tl.load(i_row + j, mask=valid, other=0).to(tl.int64)
    ok = valid & (idx >= 0) & (idx < V)
    t = tl.load(t_row + j, mask=valid, other=float("-inf")).to(tl.float32)
    s = tl.load(s_row + idx, mask=ok, other=0.0).to(tl.float32)
    return t, s, idx, ok


@triton.jit
def _teacher_max(s_row, t_row, i_row, K, V, BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """The maximum of the k teacher logits."""
    m = tl.full((), float("-inf"), tl.float32)
    for c in range(NUM_K_CHUNKS):
        t, _s, _idx, _ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, BLOCK_K)
        m = tl.maximum(m, tl.max(t, axis=0))
    return m


@triton.jit
def _weighted_expm1_minus(r, uc, z):
    """r (e^z - 1 - z) with r e^z = uc: without cancellation for |z| <= 1/4 (Taylor to z^6, < 1e-8 relative)."""
    series = z * z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0 + z * (1.0 / 120.0 + z * (1.0 / 720.0)))))
    return tl.where(tl.abs(z) <= 0.25, r * series, uc - r - r * z)


@triton.jit
def _teacher_tail(lse_ptr, r, temperature, mt, zt, log2_zt, EXACT: tl.constexpr):
    """(q_tail, gap): the teacher's mass outside K, 1 - e^gap, and gap = lse_K - lse, the log of its mass on K
    (lse_K the logsumexp of the k logits at T, from their maximum mt and log2 exp-sum log2_zt); both 0 in the
    renormalised mode and where the tail is below the rounding of the fp32 lse (NaN for a NaN lse or zt)."""
    q_tail = zt * 0.0
    gap = zt * 0.0
    if EXACT:
        lse = tl.load(lse_ptr + r)
        g = (mt / temperature - lse) + log2_zt * LN2
        tail = -exp2_difference(tl.exp2(g * LOG2E), 1.0, g * LOG2E)  # 1 - e^g without cancellation
        keep = ~(tail <= tl.maximum(TAIL_FLOOR, tl.abs(lse) * LSE_RESOLUTION))  # a NaN lse stays NaN
        q_tail = tl.where(keep, tail, 0.0)
        gap = tl.where(keep, g, 0.0)
    return q_tail, gap


@triton.jit
def _topk_terms(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t, temperature, ms, z_a, mt, EXACT: tl.constexpr,
                BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """(KL of the row in nats, before T^2; alpha, beta, Q / zt) for a student row with finite maximum ms and
    a teacher with finite reference mt (see the module docstring)."""
    zt = tl.full((), 0.0, tl.float32)
    sum_u = tl.full((), 0.0, tl.float32)
    vw = tl.full((), 0.0, tl.float32)  # sum v w, w = log2(u / v)
    for c in range(NUM_K_CHUNKS):
        t, s, _idx, ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, BLOCK_K)
        v = tl.exp2((t - mt) * scale_t)
        zt += tl.sum(v, axis=0)
        sum_u += tl.sum(tl.where(ok, tl.exp2((s - ms) * scale_t), 0.0), axis=0)
        vw += tl.sum(tl.where(v > 0, v * (((s - ms) - (t - mt)) * scale_t), 0.0), axis=0)
    log2_zt = tl.log2(zt)
    wbar = vw / zt
    c_u = tl.exp2(-wbar - log2_zt)  # r e^z = u c_u
    a = tl.full((), 0.0, tl.float32)
    for c in range(NUM_K_CHUNKS):
        t, s, _idx, ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, BLOCK_K)
        v = tl.exp2((t - mt) * scale_t)
        z = (((s - ms) - (t - mt)) * scale_t - wbar) * LN2
        term = _weighted_expm1_minus(v / zt, tl.exp2((s - ms) * scale_t) * c_u, z)
        a += tl.sum(tl.where(v > 0, term, 0.0), axis=0)
    # The student's mass outside K (none with k = V), as ln(e^-wbar rest / zt).
    rest = tl.where(K == V, 0.0, tl.maximum(z_a - sum_u, 0.0))
    lb = (tl.log2(rest) - log2_zt - wbar) * LN2
    kl_k = tl.where(lb > 0, lb + log1p((1.0 + a) * tl.exp(-tl.maximum(lb, 0.0))), log1p(a + tl.exp(lb)))
    kl_k = tl.where(wbar == float("-inf"), float("inf"), kl_k)  # the student is -inf where q > 0
    q_tail, gap = _teacher_tail(lse_ptr, r, temperature, mt, zt, log2_zt, EXACT)
    beta = zt * 0.0
    big_q = 1.0 - q_tail
    kl = tl.where(zt > 0, big_q * (kl_k + gap), 0.0)
    big_p = sum_u / z_a
    if EXACT:
        p_raw = rest / z_a
        p_tail = tl.maximum(p_raw, TAIL_FLOOR)
        kl += tl.where(q_tail > 0, q_tail * (tl.log(tl.maximum(q_tail, TAIL_FLOOR)) - tl.log(p_tail)), 0.0)
        beta = tl.where((q_tail > 0) & (p_raw > TAIL_FLOOR), q_tail / p_tail, 0.0)  # a floored tail: no gradient
    kl = tl.where(z_a != z_a, z_a, kl)  # a NaN in the student row
    return kl, big_q - beta * big_p, beta, tl.where(zt > 0, big_q / zt, 0.0)


@triton.jit
def _reverse(DIVERGENCE: tl.constexpr):
    """Whether the divergence is one of the reverse KLs, whose a_j drop a constant 1 (kernels/divergence.py)."""
    return (DIVERGENCE == "reverse_kl") or (DIVERGENCE == "skew_reverse_kl")


@triton.jit
def _token_buckets(t, s, ok, scale_t, ms, la, mt, log2_p_scale, param, EXACT: tl.constexpr,
                   DIVERGENCE: tl.constexpr):
    """(l_j, a_j, q_j) of kernels/divergence.py at a block of the k token buckets: the teacher's
    p_j = 2^((t_j - mt) scale_t + log2_p_scale) (Q r_j; log2_p_scale = -inf: no finite k logit), the student's
    q_j = pi_{i_j} = 2^((s_j - ms) scale_t - la) (0 at an index outside [0, V) and past k), d = log p_j - log q_j
    with the logit differences taken first. In the renormalised mode the student's k buckets hold less than
    its whole mass, so the constant 1 the reverse KLs' a_j drop (it cancels in a_j - c only over a whole
    distribution) is added back."""
    s = tl.where(ok, s, float("-inf"))
    p = tl.exp2((t - mt) * scale_t + log2_p_scale)
    q = tl.exp2((s - ms) * scale_t - la)
    d = (((t - mt) - (s - ms)) * scale_t + (log2_p_scale + la)) * LN2
    term, a = divergence_term(p, q, d, param, DIVERGENCE)
    if not EXACT:
        if _reverse(DIVERGENCE):
            a = a + 1.0
    return term, a, q


@triton.jit
def _divergence_terms(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t, temperature, ms, z_a, la, mt, param,
                      EXACT: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_K: tl.constexpr,
                      NUM_K_CHUNKS: tl.constexpr):
    """The divergences other than the forward KL on the buckets (csrc/topk_kl_ce.cpp's divergence_terms): the k
    tokens and, in the exact mode, the tail (the teacher's q_tail against the student's mass outside K). With
    a_b = dl_b/dq_b and c = sum_b q_b a_b the gradient is T pi_i (a_{b(i)} - c), b(i) the bucket of token i
    (a = 0 outside K in the renormalised mode). Returns (the row's divergence in nats, before T^2; the dense
    coefficient alpha = a_tail - c; c; log2_p_scale of :func:`_token_buckets`); NaN for a NaN on either side."""
    zt = tl.full((), 0.0, tl.float32)
    sum_u = tl.full((), 0.0, tl.float32)
    for blk in range(NUM_K_CHUNKS):
        t, s, _idx, ok = _teacher_block(s_row, t_row, i_row, blk * BLOCK_K, K, V, BLOCK_K)
        zt += tl.sum(tl.exp2((t - mt) * scale_t), axis=0)
        sum_u += tl.sum(tl.where(ok, tl.exp2((s - ms) * scale_t), 0.0), axis=0)
    log2_zt = tl.log2(zt)
    q_tail, gap = _teacher_tail(lse_ptr, r, temperature, mt, zt, log2_zt, EXACT)
    # No finite k logit (the exact mode's tail holds it all): p_j = 0, d = -inf where q_j > 0.
    log2_p_scale = tl.where(zt > 0, gap * LOG2E - log2_zt, float("-inf"))
    loss = tl.full((), 0.0, tl.float32)
    c_sum = tl.full((), 0.0, tl.float32)
    for blk in range(NUM_K_CHUNKS):
        t, s, _idx, ok = _teacher_block(s_row, t_row, i_row, blk * BLOCK_K, K, V, BLOCK_K)
        term, a, q = _token_buckets(t, s, ok, scale_t, ms, la, mt, log2_p_scale, param, EXACT, DIVERGENCE)
        loss += tl.sum(term, axis=0)
        c_sum += tl.sum(q * a, axis=0)
    a_tail = zt * 0.0
    if EXACT:
        q_rest = tl.where(K == V, 0.0, tl.maximum(z_a - sum_u, 0.0)) / z_a
        term, a_tail = divergence_term(q_tail, q_rest, tl.log(q_tail) - tl.log(q_rest), param, DIVERGENCE)
        loss += term
        c_sum += q_rest * a_tail
    # A NaN makes the row NaN (the terms' q > 0 / p > 0 guards would drop it); q_tail carries the lse's.
    nan = (z_a != z_a) | (zt != zt) | (q_tail != q_tail)
    c_sum = tl.where(nan, float("nan"), c_sum)
    return tl.where(nan, float("nan"), loss), a_tail - c_sum, c_sum, log2_p_scale


@triton.jit
def _dense_grad_chunk(s_vec, g_vec, k, h, V, scale_t, ms, la, mc, lc, label, kl_scale, ce_coef, USE_KL, USE_CE,
                      MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    s = load_chunk(s_vec, k, h, V, float("-inf"), MASKED, BLOCK_V)
    g = tl.zeros([BLOCK_V], tl.float32)
    if USE_KL:
        g += kl_scale * tl.exp2((s - ms) * scale_t - la)
    if USE_CE:
        g += ce_coef * (tl.exp2((s - mc) * LOG2E - lc) - tl.where(chunk_cols(k, h, BLOCK_V) == label, 1.0, 0.0))
    store_chunk(g_vec, k, h, V, g, MASKED, BLOCK_V)


@triton.jit
def _dense_grad(s_vec, g_vec, h, n, V, scale_t, ms, la, mc, lc, label, kl_scale, ce_coef, USE_KL, USE_CE,
                BLOCK_V: tl.constexpr):
    """g = kl_scale * p + ce_coef * (P - onehot(label)) over an ``aligned_row`` in the reverse of the
    statistics pass's order (head, tail, then the interior back to front): the likeliest still cached first.
    p = exp2((s - ms) log2e / T - la), P = exp2((s - mc) log2e - lc)."""
    _dense_grad_chunk(s_vec, g_vec, 0, h, V, scale_t, ms, la, mc, lc, label, kl_scale, ce_coef, USE_KL, USE_CE, True,
                      BLOCK_V)
    if n > 1:
        _dense_grad_chunk(s_vec, g_vec, n - 1, h, V, scale_t, ms, la, mc, lc, label, kl_scale, ce_coef, USE_KL,
                          USE_CE, True, BLOCK_V)
    for j in range(2, n):
        _dense_grad_chunk(s_vec, g_vec, n - j, h, V, scale_t, ms, la, mc, lc, label, kl_scale, ce_coef, USE_KL,
                          USE_CE, False, BLOCK_V)


@triton.jit
def _topk_grad(s_row, t_row, i_row, g_row, K, V, scale_t, ms, la, mt, q_scale, mc, lc, label, kl_coef, alpha, beta,
               c, log2_p_scale, param, ce_coef, USE_CE, EXACT: tl.constexpr, DIVERGENCE: tl.constexpr,
               BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """Overwrite the k gradient entries: kl_coef ((alpha + beta) p - q) + ce_coef (P - onehot(label)),
    q = q_scale exp2((t - mt) log2e / T), for the forward KL; kl_coef q_j (a_j - c) (:func:`_divergence_terms`)
    in place of the first term for the others."""
    for blk in range(NUM_K_CHUNKS):
        t, s, idx, ok = _teacher_block(s_row, t_row, i_row, blk * BLOCK_K, K, V, BLOCK_K)
        if DIVERGENCE == "forward_kl":
            g = kl_coef * ((alpha + beta) * tl.exp2((s - ms) * scale_t - la) - q_scale * tl.exp2((t - mt) * scale_t))
        else:
            _term, a, q = _token_buckets(t, s, ok, scale_t, ms, la, mt, log2_p_scale, param, EXACT, DIVERGENCE)
            g = kl_coef * (q * (a - c))
        if USE_CE:
            g += ce_coef * (tl.exp2((s - mc) * LOG2E - lc) - tl.where(idx == label, 1.0, 0.0))
        tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def _topk_row(s_row, s_vec, t_row, i_row, lse_ptr, g_row, g_vec, h, n, r, K, V, scale_t, temperature, param, label,
              use_kl, use_ce, kl_coef, ce_coef, WRITE_GRAD: tl.constexpr, EXACT: tl.constexpr,
              DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """(kl, ce) of one row with at least one term; with WRITE_GRAD its gradient for
    (kl_coef, ce_coef) (kl_coef already times T). ``s_row`` / ``g_row`` point at column 0 (the sparse
    accesses), ``s_vec`` / ``g_vec`` at column -h (the ``aligned_row`` streams, n chunks). Every divergence
    takes the same two passes over the vocabulary (its terms live on the k + 1 buckets)."""
    m_a, z_a, m_c, z_c = _student_stats(s_vec, h, n, V, scale_t, use_kl, use_ce, BLOCK_V)
    # Finite references: a row -inf everywhere (z = 0) gets probabilities 0, not nan; a NaN in the row
    # makes z NaN (the maximum may skip it).
    ms = tl.where(m_a == float("-inf"), 0.0, m_a)
    la = tl.where(z_a == 0, 0.0, tl.log2(z_a))
    mc = tl.where(m_c == float("-inf"), 0.0, m_c)
    lc = tl.where(z_c == 0, 0.0, tl.log2(z_c))
    kl = 0.0
    ce = 0.0
    alpha = 0.0
    beta = 0.0
    q_scale = 0.0
    c = 0.0
    log2_p_scale = 0.0
    mt = tl.full((), 0.0, tl.float32)
    # Rows that are -inf everywhere (student, or teacher) have KL 0 and no KL gradient.
    kl_on = use_kl & (z_a != 0)
    if kl_on:
        mt = _teacher_max(s_row, t_row, i_row, K, V, BLOCK_K, NUM_K_CHUNKS)
        if EXACT:
            kl_on = tl.load(lse_ptr + r) != float("-inf")
        else:
            kl_on = mt != float("-inf")
        mt = tl.where(mt == float("-inf"), 0.0, mt)  # all k logits -inf (exact mode): the tail holds it all
    if kl_on:
        if DIVERGENCE == "forward_kl":
            x, alpha, beta, q_scale = _topk_terms(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t, temperature, ms,
                                                  z_a, mt, EXACT, BLOCK_K, NUM_K_CHUNKS)
            kl = tl.maximum(temperature * temperature * x, 0.0)
        else:
            x, alpha, c, log2_p_scale = _divergence_terms(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t,
                                                          temperature, ms, z_a, la, mt, param, EXACT,
                                                          DIVERGENCE, BLOCK_K, NUM_K_CHUNKS)
            kl = temperature * temperature * x
            # A divergence is never below 0 (rounding), but for the reverse KLs in the renormalised mode, whose
            # student side (mass sum_K q < 1) makes them negative at times.
            if EXACT or not _reverse(DIVERGENCE):
                kl = tl.maximum(kl, 0.0)
        kl = tl.where(x != x, x, kl)  # NaN stays
    if use_ce:
        in_range = (label >= 0) & (label < V)
        s_y = tl.load(s_row + label, mask=in_range, other=0.0).to(tl.float32)
        ce = tl.where(z_c == 0, 0.0, lc * LN2 + (mc - s_y))
    if WRITE_GRAD:
        kl_coef = tl.where(kl_on, kl_coef, 0.0)
        ce_coef = tl.where(z_c == 0, 0.0, ce_coef)
        _dense_grad(s_vec, g_vec, h, n, V, scale_t, ms, la, mc, lc, label, kl_coef * alpha, ce_coef, use_kl, use_ce,
                    BLOCK_V)
        if kl_on:
            # The k entries are rewritten by other threads of this program than wrote them densely.
            tl.debug_barrier()
            _topk_grad(s_row, t_row, i_row, g_row, K, V, scale_t, ms, la, mt, q_scale, mc, lc, label, kl_coef, alpha,
                       beta, c, log2_p_scale, param, ce_coef, use_ce, EXACT, DIVERGENCE, BLOCK_K, NUM_K_CHUNKS)
    return kl, ce


@triton.jit
def _student_rows(r, s_ptr, grad_ptr, S, s_stride_b, s_stride_s, V, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of the student and of its gradient: (s_row, s_vec, g_row, g_vec, h, n), *_row at column 0,
    *_vec the ``aligned_row`` at column -h for the streamed passes (n chunks, 128-bit interior)."""
    s_off = row_start(r, S, s_stride_b, s_stride_s)
    h, n = row_split(s_off, V, ALIGN, BLOCK_V)
    return (s_ptr + s_off, aligned_row(s_ptr, s_off, h, ALIGN),
            grad_ptr + r * V, aligned_row(grad_ptr, r * V, h, ALIGN),
            h, n)


@triton.jit
def topk_kl_ce_fwd_kernel(
    s_ptr, t_ptr, i_ptr, lse_ptr, labels_ptr, mask_ptr, coef_ptr, kl_ptr, ce_ptr, grad_ptr,
    S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, i_stride_b, i_stride_s, V, K,
    scale_t, temperature, ignore_index, divergence_param,
    EXACT: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_K_CHUNKS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s_row, s_vec, g_row, g_vec, h, n = _student_rows(r, s_ptr, grad_ptr, S, s_stride_b, s_stride_s, V, ALIGN,
                                                     BLOCK_V)
    t_row = t_ptr + row_start(r, S, t_stride_b, t_stride_s)
    i_row = i_ptr + row_start(r, S, i_stride_b, i_stride_s)
    use_kl, use_ce, label = row_flags(r, labels_ptr, mask_ptr, ignore_index, HAS_LABELS, HAS_MASK)
    kl = 0.0
    ce = 0.0
    if use_kl | use_ce:
        kl, ce = _topk_row(s_row, s_vec, t_row, i_row, lse_ptr, g_row, g_vec, h, n, r, K, V, scale_t, temperature,
                           divergence_param, label, use_kl, use_ce, tl.load(coef_ptr) * temperature,
                           tl.load(coef_ptr + 1), WRITE_GRAD, EXACT, DIVERGENCE, BLOCK_V, BLOCK_K, NUM_K_CHUNKS)
    elif WRITE_GRAD:
        fill_row(g_vec, h, n, V, 0.0, False, BLOCK_V)
    tl.store(kl_ptr + r, kl)
    tl.store(ce_ptr + r, ce)


@triton.jit
def topk_kl_ce_bwd_kernel(
    s_ptr, t_ptr, i_ptr, lse_ptr, labels_ptr, mask_ptr, coef_ptr, gkl_ptr, gce_ptr, grad_ptr,
    S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, i_stride_b, i_stride_s, V, K,
    scale_t, temperature, ignore_index, divergence_param,
    EXACT: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    use_kl, use_ce, label = row_flags(r, labels_ptr, mask_ptr, ignore_index, HAS_LABELS, HAS_MASK)
    if use_kl | use_ce:
        factor, rescale, g_kl, g_ce = rescale_factor(r, coef_ptr, gkl_ptr, gce_ptr, use_kl, use_ce,
                                                     grad_ptr.dtype.element_ty != tl.float32)
        s_row, s_vec, g_row, g_vec, h, n = _student_rows(r, s_ptr, grad_ptr, S, s_stride_b, s_stride_s, V, ALIGN,
                                                         BLOCK_V)
        if rescale:
            if factor != 1.0:  # exactly coef: the buffer already is the gradient
                fill_row(g_vec, h, n, V, factor, True, BLOCK_V)
        else:
            t_row = t_ptr + row_start(r, S, t_stride_b, t_stride_s)
            i_row = i_ptr + row_start(r, S, i_stride_b, i_stride_s)
            _topk_row(s_row, s_vec, t_row, i_row, lse_ptr, g_row, g_vec, h, n, r, K, V, scale_t, temperature,
                      divergence_param, label, use_kl, use_ce, g_kl * temperature, g_ce, True, EXACT, DIVERGENCE,
                      BLOCK_V, BLOCK_K, NUM_K_CHUNKS)


def _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, divergence,
                 divergence_param, block_v, num_warps, block_k):
    vocab, k = student.shape[-1], values.shape[-1]
    block, warps, _ = tuning_for(vocab)
    block_k = block_k or min(max(triton.next_power_of_2(k), 16), MAX_BLOCK_K)
    S, s_sb, s_ss = row_geometry(student)
    _, t_sb, t_ss = row_geometry(values)
    _, i_sb, i_ss = row_geometry(index)
    args = dict(
        s_ptr=student, t_ptr=values, i_ptr=index, lse_ptr=student if lse is None else lse.reshape(-1),
        labels_ptr=student if labels is None else labels.reshape(-1),
        mask_ptr=student if kl_mask is None else kl_mask.reshape(-1), coef_ptr=coef,
        S=S, s_stride_b=s_sb, s_stride_s=s_ss, t_stride_b=t_sb, t_stride_s=t_ss, i_stride_b=i_sb, i_stride_s=i_ss,
        V=vocab, K=k, scale_t=LOG2E.value / temperature, temperature=temperature, ignore_index=ignore_index,
        divergence_param=divergence_param, EXACT=lse is not None, HAS_LABELS=labels is not None,
        HAS_MASK=kl_mask is not None, DIVERGENCE=divergence, BLOCK_V=block_v or block,
        BLOCK_K=block_k, NUM_K_CHUNKS=triton.cdiv(k, block_k),
    )
    return args, dict(num_warps=num_warps or warps, maxnreg=MAXNREG)


def fwd_launch(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows, grad,
               divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None, block_k=None):
    """(grid, {parameter: argument}, launch options) of the forward launch: what :func:`topk_kl_ce_rows`
    launches and what the ahead-of-time tests compile (from meta tensors)."""
    args, options = _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                 divergence, divergence_param, block_v, num_warps, block_k)
    args.update(kl_ptr=kl_rows, ce_ptr=ce_rows, grad_ptr=kl_rows if grad is None else grad,
                WRITE_GRAD=grad is not None,
                ALIGN=vector_width(student) if grad is None else vector_width(student, grad))
    return (kl_rows.numel(),), args, options


def bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask, coef, temperature,
               ignore_index, divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None,
               block_k=None):
    """(grid, {parameter: argument}, launch options) of the backward launch (see :func:`fwd_launch`)."""
    args, options = _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                 divergence, divergence_param, block_v, num_warps, block_k)
    args.update(gkl_ptr=grad_kl_rows, gce_ptr=grad_ce_rows, grad_ptr=grad, ALIGN=vector_width(student, grad))
    return (grad_kl_rows.numel(),), args, options


def topk_kl_ce_rows(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows,
                    grad, divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None, block_k=None):
    """Launch :func:`topk_kl_ce_fwd_kernel` into the caller's ``kl_rows``, ``ce_rows`` (fp32, contiguous,
    one value per row) and ``grad`` (contiguous, the student's shape and dtype; ``None``: no gradient).

    ``values`` / ``index``: ``[..., k]`` over the student's row dims, unit stride along k; ``lse`` (fp32),
    ``labels`` (int64), ``kl_mask`` (bool): contiguous over the row dims or ``None``; ``coef``: the fp32
    ``[kl_coef, ce_coef]`` device tensor; ``divergence`` / ``divergence_param`` replace the forward KL
    (kernels/divergence.py, on the buckets). Inputs are validated by the callers (distil._ops.topk_kl_ce).
    ``block_v`` / ``num_warps`` / ``block_k`` override the tuning (tests force chunking with them)."""
    if student.shape[-1] == 0:
        kl_rows.zero_()
        ce_rows.zero_()
    if kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = fwd_launch(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                     kl_rows, ce_rows, grad, divergence, divergence_param, block_v, num_warps, block_k)
    topk_kl_ce_fwd_kernel[grid](**args, **options)


def topk_kl_ce_rows_backward(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask, coef,
                             temperature, ignore_index, divergence="forward_kl", divergence_param=0.0, block_v=None,
                             num_warps=None, block_k=None):
    """Launch :func:`topk_kl_ce_bwd_kernel`: rewrites ``grad`` in place for the incoming per-row gradients
    (fp32, contiguous); see the module docstring."""
    if grad_kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask,
                                     coef, temperature, ignore_index, divergence, divergence_param, block_v, num_warps,
                                     block_k)
    topk_kl_ce_bwd_kernel[grid](**args, **options)
