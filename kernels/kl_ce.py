"""Fused temperature-KL + cross-entropy over the vocabulary, gradient written in the forward.

One program per row r of student logits s and teacher logits t ([N, V] or [B, S, V], last-dim
stride 1, any other strides: the row convention of kernels/rows.py). With p = softmax(s/T),
q = softmax(t/T), P = softmax(s), in fp32, and coef = [kl_coef, ce_coef]:

    kl_rows[r] = T^2 * sum_j q_j (log q_j - log p_j)      where kl_mask[r]        (else 0)
    ce_rows[r] = logsumexp(s_r) - s_r[y_r]                  where y_r != ignore    (else 0)
    grad[r]    = kl_coef * T * (p - q) + ce_coef * (P - onehot(y_r))   (masked terms dropped)

This is ``nn.KLDivLoss(reduction="none")(log_softmax(s/T), softmax(t/T)).sum(-1) * T**2`` and
``nn.CrossEntropyLoss(reduction="none", ignore_index=...)``, with d(coef . loss)/ds in the same launch.
All exponentials are exp2 of log2e-scaled differences from the row maxima (taken before the scaling,
so large logits keep their precision); every statistic is an online (running max, running sum)
log-sum-exp accumulated in fp32. CE = log z + (max - s_y); above T = 4 the KL is formed without the
cancellation of two ~log V terms (see _row_stats) and it is never negative. NaN in a row read gives NaN.

Traffic model (bytes through DRAM per row, e = element size):
- single-block path (V <= 1024): read s and t once from DRAM (the gradient pass re-reads them from
  L1), write grad once: (2 + 1) * V * e.
- chunked path (V > 1024): pass 1 reads s and t chunk by chunk for the statistics, pass 2 reads them
  again and writes grad. The second read hits L2 while the rows of all resident programs fit
  (2 * V * e per row: 122 KB for V=30522 in bf16; 528 resident rows with the tuning below against
  50 MB of L2 on an H100), so DRAM traffic is between (2 + 1) * V * e and, when rows are
  evicted between the passes, (4 + 1) * V * e.
- no gradient requested: 2 * V * e (pass 1 only).
- rows with neither a KL nor a CE term: the gradient row is written as zeros, nothing is read.

Instruction model (memory instructions per thread, per row and tensor, BLOCK_V = 2048 x 8 warps, so
8 elements per thread and chunk; n = ceil((V + h) / 2048) chunks, h < 16 / e the row's 16-byte phase):
rows are cut at 16-byte boundaries (kernels/rows.py): 16 scalar accesses in the masked head and tail
chunks plus (n - 2) * 8 * e / 16 128-bit ones in the unmasked interior, at any V and stride (V = 30522:
29 in bf16 / fp16, 42 in fp32). tests/test_ops.py asserts from the sm_80 / sm_90 PTX that every global
access in the main loops is 128-bit at V in {30522, 50257, 32000, 128256} for fp32, bf16 and fp16
(the masked-chunk kernel this replaced, and its measured difference: benchmarks/NOTES_rows.md).

-inf policy: a -inf logit is a token of probability exactly 0; q_j = 0 terms contribute 0 (xlogy), a
row that is -inf everywhere in s or t has loss 0 and gradient 0, and a -inf student entry where
q_j > 0 gives +inf, as PyTorch does.

Divergences: the constexpr DIVERGENCE replaces the forward KL by another divergence of
kernels/divergence.py (reverse KL, JSD, skew KLs, TVD; ``divergence_param`` their beta / alpha), still
times T^2 and with the same -inf, NaN, mask and label policies. The forward KL takes the two passes above
(its loss is an online sum); every other divergence takes three: the statistics (now without the KL's
sums), the loss and c = sum_j q_j a_j (each term needs both normalised probabilities, so it cannot start
before the first pass ends), and the gradient T q_j (a_j - c): one more read of s and t per row, from L2
while the row is resident. The mixture divergences (jsd, skew_*) run under MIXTURE_MAXNREG.

The backward kernel turns the forward's grad (prepared for coef) into the gradient for the incoming
per-row gradients (g_kl, g_ce), in place: nothing when g equals coef exactly (the usual
``loss.backward()``: distil._ops.common.announced_coef forms coef bit-equal to autograd's g), a
per-row scale when g is proportional to coef (relative tolerance 1e-6) and the factor keeps the
dtype's precision (rows.rescale_keeps_precision: 16-bit rows within [1/2, 2]), an exact recomputation
otherwise. The CPU twin is csrc/kl_ce.cpp; the float64 reference distil.reference.kl_ce_rows.

Launchers take caller-allocated outputs, so a caller that produces the logits in row chunks (the
fused LM-head loss) launches once per chunk into row slices of its preallocated buffers.
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
    finite_lse,
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

# The register cap of streamed rows (kernels/rows.py's TUNING; a one-block row has none): with the masked head
# and tail chunks beside the unmasked interior, ptxas takes 110+ registers on sm_90 unless capped; 80 keeps
# three rows per SM with 0 spills everywhere. tests/test_ops.py compiles every entry and specialisation for
# sm_80 and sm_90 and asserts 0 spills and 128-bit accesses in the loops.
STREAMED_MAXNREG = 80
# Above this temperature the KL is formed without the cancellation of two ~log V terms (see _row_stats);
# at or below it that cancellation costs less than eager fp32's own rounding, and 15 registers less.
PRECISE_KL_ABOVE = 4.0
# Its extra sums need registers: with an fp32 row, chunks of 1024 (4 elements, one 128-bit access per
# thread at 8 warps) keep it spill-free under the 80-register cap, where 2048 spills on sm_90; 16-bit rows
# keep TUNING's chunks (8 elements, 128 bits, no spills).
PRECISE_KL_BLOCK_V = 1024


# The mixture divergences (kernels/divergence.py) take a log, an exp and a division per element in their
# second and third passes: under STREAMED_MAXNREG = 80 skew_kl spills on sm_90 (4-16 registers, and more at
# 88); 96 (two rows per SM instead of three) builds them all without spills.
MIXTURE_MAXNREG = 96
MIXTURES = ("jsd", "skew_kl", "skew_reverse_kl")


def launch_options(vocab, num_warps=None, divergence="forward_kl"):
    """Triton launch options for a vocabulary size: TUNING's num_warps and, for streamed rows,
    STREAMED_MAXNREG (MIXTURE_MAXNREG for the mixture divergences), or ``num_warps`` without a register cap."""
    _, warps, streamed = tuning_for(vocab)
    if num_warps:
        return {"num_warps": num_warps, "maxnreg": None}
    if not streamed:
        return {"num_warps": warps, "maxnreg": None}
    return {"num_warps": warps, "maxnreg": MIXTURE_MAXNREG if divergence in MIXTURES else STREAMED_MAXNREG}


@triton.jit
def _stats_chunk(s_row, t_row, k, h, V, scale_t, m_s, m_t, d_a, d_b, d_c, w, e, USE_KL, USE_CE,
                 PRECISE_KL: tl.constexpr, DIVERGENCE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Fold chunk k into the running statistics of :func:`_row_stats` (w and e: the forward KL only)."""
    s = load_chunk(s_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
    next_m_s = tl.maximum(m_s, tl.max(s, axis=0))
    if USE_KL:
        t = load_chunk(t_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
        _, ms_ref, next_d_a, ea = online_scaled_lse_update(m_s, d_a, s, scale_t)
        next_m_t, mt_ref, next_d_b, eb = online_scaled_lse_update(m_t, d_b, t, scale_t)
        # Carry w and e over to the new maxima: the teacher's terms scale by alpha_b and delta
        # shifts by `shift`; d_a scales by alpha_a = alpha_b * 2**z.
        if DIVERGENCE == "forward_kl":
            alpha_a = tl.exp2((m_s - ms_ref) * scale_t)
            alpha_b = tl.exp2((m_t - mt_ref) * scale_t)
            shift = ((ms_ref - finite_lse(m_s)) - (mt_ref - finite_lse(m_t))) * scale_t
            delta = ((t - mt_ref) - (s - ms_ref)) * scale_t
            # q_j = 0 terms contribute 0 even where delta is -inf or nan (xlogy).
            w = alpha_b * (w + shift * d_b) + tl.sum(tl.where(eb > 0, eb * delta, 0.0), axis=0)
            if PRECISE_KL:
                z = ((m_s - ms_ref) - (m_t - mt_ref)) * scale_t
                e = (alpha_a * e + exp2_difference(alpha_a, alpha_b, z) * d_b
                     + tl.sum(exp2_difference(ea, eb, -delta), axis=0))
        d_a = next_d_a
        d_b = next_d_b
        m_t = next_m_t
    if USE_CE:
        _, _, d_c, _ = online_scaled_lse_update(m_s, d_c, s, LOG2E)
    return next_m_s, m_t, d_a, d_b, d_c, w, e


@triton.jit
def _row_stats(s_row, t_row, h, n, V, scale_t, USE_KL, USE_CE, PRECISE_KL: tl.constexpr, DIVERGENCE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Statistics of one row: (ms, mt, log2 d_a, log2 d_b, log2 d_c, KL in nats; the KL for the forward KL
    only: the other divergences need a pass of their own, :func:`_divergence_sums`).

    ms, mt are the row maxima of s and t (in logit units: differences s - ms are taken before any
    scaling, so large logits keep their precision); d_a = sum 2^((s - ms) * scale_t),
    d_b = sum 2^((t - mt) * scale_t), d_c = sum 2^((s - ms) * log2e). With q = softmax(t/T) and
    delta_j = ((t_j - mt) - (s_j - ms)) * scale_t, KL = ln2 * sum_j q_j delta_j + log(d_a / d_b), the last
    term as log1p(e / d_b) with e = d_a - d_b summed without cancellation when PRECISE_KL (large T):
    there both terms are O(1/T) and cancel to O(1/T^2), which log2 d_a - log2 d_b (each ~log2 V)
    would bury in rounding. Small T takes the difference of logs (e costs ~15 registers).
    The unmasked interior (kernels/rows.py), then the masked tail and head: the two masked chunks sit
    next to the gradient pass's, so nothing of theirs (per-element addresses, masks) stays live across a loop.
    """
    zero = tl.full((), 0.0, tl.float32)
    m_s = zero + float("-inf")
    m_t = zero + float("-inf")
    d_a = zero
    d_b = zero
    d_c = zero
    w = zero  # sum_j 2^((t_j - mt) * scale_t) * delta_j, 0 where q_j = 0 (xlogy)
    e = zero  # d_a - d_b
    for k in range(1, n - 1):
        m_s, m_t, d_a, d_b, d_c, w, e = _stats_chunk(s_row, t_row, k, h, V, scale_t, m_s, m_t, d_a, d_b, d_c, w,
                                                     e, USE_KL, USE_CE, PRECISE_KL, DIVERGENCE, False, BLOCK_V)
    if n > 1:
        m_s, m_t, d_a, d_b, d_c, w, e = _stats_chunk(s_row, t_row, n - 1, h, V, scale_t, m_s, m_t, d_a, d_b, d_c,
                                                     w, e, USE_KL, USE_CE, PRECISE_KL, DIVERGENCE, True, BLOCK_V)
    m_s, m_t, d_a, d_b, d_c, w, e = _stats_chunk(s_row, t_row, 0, h, V, scale_t, m_s, m_t, d_a, d_b, d_c, w, e,
                                                 USE_KL, USE_CE, PRECISE_KL, DIVERGENCE, True, BLOCK_V)
    la = tl.log2(d_a)
    lb = tl.log2(d_b)
    if PRECISE_KL:
        kl = LN2 * (w / d_b) + log1p(e / d_b)
    else:
        kl = LN2 * (w / d_b + la - lb)
    return m_s, m_t, la, lb, tl.log2(d_c), kl


@triton.jit
def _divergence_elements(s, t, scale_t, ms, mt, la, lb, param, DIVERGENCE: tl.constexpr):
    """(l_j, a_j, q_j) of kernels/divergence.py for a chunk of s and t (-inf outside the row: 0 terms),
    from the row statistics (finite): q the student's and p the teacher's probabilities, d = log p - log q."""
    xs = (s - ms) * scale_t - la
    xt = (t - mt) * scale_t - lb
    q = tl.exp2(xs)
    p = tl.exp2(xt)
    d = (((t - mt) - (s - ms)) * scale_t + (la - lb)) * LN2
    term, a = divergence_term(p, q, d, param, DIVERGENCE)
    return term, a, q


@triton.jit
def _divergence_chunk(s_row, t_row, k, h, V, scale_t, ms, mt, la, lb, param, loss, c, DIVERGENCE: tl.constexpr,
                      MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    s = load_chunk(s_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
    t = load_chunk(t_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
    term, a, q = _divergence_elements(s, t, scale_t, ms, mt, la, lb, param, DIVERGENCE)
    return loss + tl.sum(term, axis=0), c + tl.sum(q * a, axis=0)


@triton.jit
def _divergence_sums(s_row, t_row, h, n, V, scale_t, ms, mt, la, lb, param, DIVERGENCE: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """The second pass of the divergences other than the forward KL (kernels/divergence.py), over a row
    that is not -inf everywhere: (sum_j l_j in nats, c = sum_j q_j a_j), in the order of :func:`_row_stats`."""
    loss = tl.full((), 0.0, tl.float32)
    c = tl.full((), 0.0, tl.float32)
    for k in range(1, n - 1):
        loss, c = _divergence_chunk(s_row, t_row, k, h, V, scale_t, ms, mt, la, lb, param, loss, c, DIVERGENCE,
                                    False, BLOCK_V)
    if n > 1:
        loss, c = _divergence_chunk(s_row, t_row, n - 1, h, V, scale_t, ms, mt, la, lb, param, loss, c, DIVERGENCE,
                                    True, BLOCK_V)
    loss, c = _divergence_chunk(s_row, t_row, 0, h, V, scale_t, ms, mt, la, lb, param, loss, c, DIVERGENCE, True,
                                BLOCK_V)
    return loss, c


@triton.jit
def _grad_chunk(s_row, t_row, g_row, k, h, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c, param,
                USE_KL, USE_CE, DIVERGENCE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    s = load_chunk(s_row, k, h, V, 0.0, MASKED, BLOCK_V)
    g = tl.zeros([BLOCK_V], tl.float32)
    if USE_KL:
        if DIVERGENCE == "forward_kl":
            t = load_chunk(t_row, k, h, V, 0.0, MASKED, BLOCK_V)
            p = tl.exp2((s - ms) * scale_t - la)
            q = tl.exp2((t - mt) * scale_t - lb)
            g += kl_coef * (p - q)
        else:
            # -inf outside the row: the masked lanes' terms are 0, and never stored.
            t = load_chunk(t_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
            s_kl = load_chunk(s_row, k, h, V, float("-inf"), MASKED, BLOCK_V)
            _, a, q = _divergence_elements(s_kl, t, scale_t, ms, mt, la, lb, param, DIVERGENCE)
            g += kl_coef * q * (a - c)
    if USE_CE:
        big_p = tl.exp2((s - ms) * LOG2E - lc)
        g += ce_coef * (big_p - tl.where(chunk_cols(k, h, BLOCK_V) == label, 1.0, 0.0))
    store_chunk(g_row, k, h, V, g, MASKED, BLOCK_V)


@triton.jit
def _write_grad_row(s_row, t_row, g_row, h, n, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c, param,
                    USE_KL, USE_CE, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """g = kl_coef * (p - q) + ce_coef * (P - onehot(label)) over the row from the statistics of
    :func:`_row_stats` (made finite for rows that are -inf everywhere), chunk by chunk in the reverse of
    its order: the head and tail it read last, then the interior back to front, the likeliest still in L1/L2.
    Another divergence's term is kl_coef * q * (a - c) (kernels/divergence.py)."""
    _grad_chunk(s_row, t_row, g_row, 0, h, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c, param,
                USE_KL, USE_CE, DIVERGENCE, True, BLOCK_V)
    if n > 1:
        _grad_chunk(s_row, t_row, g_row, n - 1, h, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c,
                    param, USE_KL, USE_CE, DIVERGENCE, True, BLOCK_V)
    for j in range(2, n):
        _grad_chunk(s_row, t_row, g_row, n - j, h, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c,
                    param, USE_KL, USE_CE, DIVERGENCE, False, BLOCK_V)


@triton.jit
def _guarded_coefs(la, lb, lc, kl_coef, ce_coef):
    # Rows that are -inf everywhere (log2 of a zero sum; a NaN row's is NaN) get loss 0 and gradient 0
    # (see the -inf policy).
    kl_coef = tl.where((la == float("-inf")) | (lb == float("-inf")), 0.0, kl_coef)
    ce_coef = tl.where(lc == float("-inf"), 0.0, ce_coef)
    return kl_coef, ce_coef


@triton.jit
def _write_grad(s_row, t_row, g_row, h, n, V, scale_t, ms, mt, la, lb, lc, label, kl_coef, ce_coef, c, param, use_kl,
                use_ce, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """:func:`_write_grad_row` for the coefficients, zeroed for rows that are -inf everywhere."""
    if DIVERGENCE != "forward_kl":
        # A zero coefficient does not cancel the infinite a_j of a dead row's terms: skip them.
        use_kl = use_kl & (la != float("-inf")) & (lb != float("-inf"))
    kl_coef, ce_coef = _guarded_coefs(la, lb, lc, kl_coef, ce_coef)
    _write_grad_row(s_row, t_row, g_row, h, n, V, scale_t, finite_lse(ms), finite_lse(mt), finite_lse(la),
                    finite_lse(lb), finite_lse(lc), label, kl_coef, ce_coef, c, param, use_kl, use_ce, DIVERGENCE,
                    BLOCK_V)


@triton.jit
def _divergence(s_row, t_row, h, n, V, scale_t, ms, mt, la, lb, param, DIVERGENCE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """(loss in nats, c) of :func:`_divergence_sums` for the statistics of :func:`_row_stats`; 0 for rows
    that are -inf everywhere (their loss is 0), NaN for rows holding a NaN (whose terms' guards would drop it)."""
    dead = (la == float("-inf")) | (lb == float("-inf"))
    loss, c = _divergence_sums(s_row, t_row, h, n, V, scale_t, finite_lse(ms), finite_lse(mt), finite_lse(la),
                               finite_lse(lb), param, DIVERGENCE, BLOCK_V)
    nan = (la != la) | (lb != lb)
    loss = tl.where(nan, float("nan"), tl.where(dead, 0.0, loss))
    return loss, tl.where(nan, float("nan"), tl.where(dead, 0.0, c))


@triton.jit
def _aligned_rows(r, s_ptr, t_ptr, grad_ptr, S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, V,
                  ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row r of s, t and grad cut for 128-bit access (kernels/rows.py): (s_start, h, n, s_row, t_row,
    g_row), where s_start points at column 0 of the student row and *_row at column -h."""
    s_off = row_start(r, S, s_stride_b, s_stride_s)
    h, n = row_split(s_off, V, ALIGN, BLOCK_V)
    s_row = aligned_row(s_ptr, s_off, h, ALIGN)
    t_row = aligned_row(t_ptr, row_start(r, S, t_stride_b, t_stride_s), h, ALIGN)
    g_row = aligned_row(grad_ptr, r * V, h, ALIGN)
    return s_ptr + s_off, h, n, s_row, t_row, g_row


@triton.jit
def kl_ce_fwd_kernel(
    s_ptr, t_ptr, labels_ptr, mask_ptr, coef_ptr, kl_ptr, ce_ptr, grad_ptr,
    S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, V,
    scale_t, temperature, ignore_index, divergence_param,
    HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, PRECISE_KL: tl.constexpr,
    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    s_start, h, n, s_row, t_row, g_row = _aligned_rows(r, s_ptr, t_ptr, grad_ptr, S, s_stride_b, s_stride_s,
                                                       t_stride_b, t_stride_s, V, ALIGN, BLOCK_V)
    use_kl, use_ce, label = row_flags(r, labels_ptr, mask_ptr, ignore_index, HAS_LABELS, HAS_MASK)
    kl = 0.0
    ce = 0.0
    if use_kl | use_ce:
        ms, mt, la, lb, lc, kl_nats = _row_stats(s_row, t_row, h, n, V, scale_t, use_kl, use_ce, PRECISE_KL,
                                                 DIVERGENCE, BLOCK_V)
        c = 0.0
        if DIVERGENCE != "forward_kl":
            if use_kl:
                kl_nats, c = _divergence(s_row, t_row, h, n, V, scale_t, ms, mt, la, lb, divergence_param, DIVERGENCE,
                                         BLOCK_V)
        if use_kl:
            # 0 if either row is all -inf; never below 0 (a KL is not; nan stays nan).
            kl = tl.where((la == float("-inf")) | (lb == float("-inf")), 0.0, temperature * temperature * kl_nats)
            kl = tl.where(kl < 0.0, 0.0, kl)
        if use_ce:
            in_range = (label >= 0) & (label < V)
            s_y = tl.load(s_start + label, mask=in_range, other=0.0).to(tl.float32)
            # log z + (max - s_y): the difference first, exact at large logits.
            ce = tl.where(lc == float("-inf"), 0.0, lc * LN2 + (ms - s_y))
        if WRITE_GRAD:
            _write_grad(s_row, t_row, g_row, h, n, V, scale_t, ms, mt, la, lb, lc, label,
                        tl.load(coef_ptr) * temperature, tl.load(coef_ptr + 1), c, divergence_param, use_kl, use_ce,
                        DIVERGENCE, BLOCK_V)
    elif WRITE_GRAD:
        fill_row(g_row, h, n, V, 0.0, False, BLOCK_V)
    tl.store(kl_ptr + r, kl)
    tl.store(ce_ptr + r, ce)


@triton.jit
def kl_ce_bwd_kernel(
    s_ptr, t_ptr, labels_ptr, mask_ptr, coef_ptr, gkl_ptr, gce_ptr, grad_ptr,
    S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, V,
    scale_t, temperature, ignore_index, divergence_param,
    HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    use_kl, use_ce, label = row_flags(r, labels_ptr, mask_ptr, ignore_index, HAS_LABELS, HAS_MASK)
    if use_kl | use_ce:
        factor, rescale, g_kl, g_ce = rescale_factor(r, coef_ptr, gkl_ptr, gce_ptr, use_kl, use_ce,
                                                     grad_ptr.dtype.element_ty != tl.float32)
        _s_start, h, n, s_row, t_row, g_row = _aligned_rows(r, s_ptr, t_ptr, grad_ptr, S, s_stride_b, s_stride_s,
                                                            t_stride_b, t_stride_s, V, ALIGN, BLOCK_V)
        if rescale:
            if factor != 1.0:  # exactly coef: the buffer already is the gradient
                fill_row(g_row, h, n, V, factor, True, BLOCK_V)
        else:
            ms, mt, la, lb, lc, _kl = _row_stats(s_row, t_row, h, n, V, scale_t, use_kl, use_ce, False, DIVERGENCE,
                                                 BLOCK_V)
            c = 0.0
            if DIVERGENCE != "forward_kl":
                if use_kl:
                    _loss, c = _divergence(s_row, t_row, h, n, V, scale_t, ms, mt, la, lb, divergence_param,
                                           DIVERGENCE, BLOCK_V)
            _write_grad(s_row, t_row, g_row, h, n, V, scale_t, ms, mt, la, lb, lc, label, g_kl * temperature, g_ce,
                        c, divergence_param, use_kl, use_ce, DIVERGENCE, BLOCK_V)


def _common_args(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence, divergence_param,
                 block_v, num_warps):
    vocab = student.shape[-1]
    block, _, _ = tuning_for(vocab)
    options = launch_options(vocab, num_warps, divergence)
    S, s_sb, s_ss = row_geometry(student)
    _, t_sb, t_ss = row_geometry(teacher)
    args = dict(
        s_ptr=student, t_ptr=teacher, labels_ptr=student if labels is None else labels.reshape(-1),
        mask_ptr=student if kl_mask is None else kl_mask.reshape(-1), coef_ptr=coef,
        S=S, s_stride_b=s_sb, s_stride_s=s_ss, t_stride_b=t_sb, t_stride_s=t_ss, V=vocab,
        scale_t=LOG2E.value / temperature, temperature=temperature, ignore_index=ignore_index,
        divergence_param=divergence_param, HAS_LABELS=labels is not None, HAS_MASK=kl_mask is not None,
        DIVERGENCE=divergence, BLOCK_V=block_v or block,
    )
    return args, options


def fwd_launch(student, teacher, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows, grad,
               divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None):
    """(grid, {parameter: argument}, launch options) of the forward launch: what :func:`kl_ce_rows`
    launches and what the ahead-of-time tests compile (from meta tensors). Above PRECISE_KL_ABOVE the
    large-temperature forward KL on fp32 rows runs in chunks of PRECISE_KL_BLOCK_V unless ``block_v`` is given."""
    precise_kl = temperature > PRECISE_KL_ABOVE and divergence == "forward_kl"
    if (precise_kl and block_v is None and student.shape[-1] > PRECISE_KL_BLOCK_V
            and max(student.element_size(), teacher.element_size()) == 4):
        block_v = PRECISE_KL_BLOCK_V
    args, options = _common_args(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence,
                                 divergence_param, block_v, num_warps)
    args.update(kl_ptr=kl_rows, ce_ptr=ce_rows, grad_ptr=kl_rows if grad is None else grad,
                WRITE_GRAD=grad is not None, PRECISE_KL=precise_kl,
                ALIGN=vector_width(student, teacher) if grad is None else vector_width(student, teacher, grad))
    return (kl_rows.numel(),), args, options


def bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef, temperature,
               ignore_index, divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None):
    """(grid, {parameter: argument}, launch options) of the backward launch (see :func:`fwd_launch`)."""
    args, options = _common_args(student, teacher, labels, kl_mask, coef, temperature, ignore_index, divergence,
                                 divergence_param, block_v, num_warps)
    args.update(gkl_ptr=grad_kl_rows, gce_ptr=grad_ce_rows, grad_ptr=grad, ALIGN=vector_width(student, teacher, grad))
    return (grad_kl_rows.numel(),), args, options


def kl_ce_rows(student, teacher, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows, grad,
               divergence="forward_kl", divergence_param=0.0, block_v=None, num_warps=None):
    """Launch :func:`kl_ce_fwd_kernel` into the caller's ``kl_rows`` and ``ce_rows`` (fp32, contiguous,
    one value per row) and ``grad`` (contiguous, the student's shape and dtype; ``None``: no gradient).

    ``labels`` (int64) and ``kl_mask`` (bool) are contiguous over the row dims or ``None``; ``coef``
    is the fp32 ``[kl_coef, ce_coef]`` device tensor; ``divergence`` / ``divergence_param`` replace the
    forward KL (kernels/divergence.py). Inputs are validated once, by the public
    functions (distil._ops.kl_ce) or the op entry. ``block_v`` / ``num_warps`` override TUNING (tests
    force chunking with them; benchmarks/tune_kl_ce.py sweeps them). A caller producing the logits in
    row chunks passes row slices of its buffers; slices starting at a multiple of 8 rows keep the
    16-byte alignment the 128-bit accesses need (others run correct but scalar)."""
    if student.shape[-1] == 0:
        kl_rows.zero_()
        ce_rows.zero_()
    if kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = fwd_launch(student, teacher, labels, kl_mask, coef, temperature, ignore_index, kl_rows,
                                     ce_rows, grad, divergence, divergence_param, block_v, num_warps)
    kl_ce_fwd_kernel[grid](**args, **options)


def kl_ce_rows_backward(grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef,
                        temperature, ignore_index, divergence="forward_kl", divergence_param=0.0, block_v=None,
                        num_warps=None):
    """Launch :func:`kl_ce_bwd_kernel`: rewrites ``grad`` in place for the incoming per-row gradients
    (fp32, contiguous); see the module docstring."""
    if grad_kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef,
                                     temperature, ignore_index, divergence, divergence_param, block_v, num_warps)
    kl_ce_bwd_kernel[grid](**args, **options)
