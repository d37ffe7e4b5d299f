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
the teacher's true top-k probabilities q_j = exp(t_j/T - lse) plus one tail bucket holding the rest
of its mass, against the student's mass on the same k tokens and on the rest:

    Q = sum_K q_j,  P_K = sum_K p_{i_j},  q_tail = max(1 - Q, F),  p_tail = max(1 - P_K, F)
    kl_rows[r] = T^2 * (sum_K q_j (log q_j - log p_{i_j}) + q_tail (log q_tail - log p_tail))
    d kl_rows / d s_i = T * (alpha p_i + [i = i_j] (beta p_i - q_j)),
        beta = q_tail / p_tail (0 when p_tail is floored),  alpha = Q - beta P_K

i.e. T (p - q~) where q~ is q on K and beta p outside K: the tail mass is spread over the other
tokens in the student's proportions. With k = V the tails are rounding noise below the floor F,
beta = 0, and this is the dense ``kl_ce_rows`` KL. F = TAIL_FLOOR = 2^-16: an fp32 sum of
probabilities computed from an fp32 lse (one ulp of lse ~ 1e-6 relative in every q_j) cannot
resolve a tail below it. The renormalised mode is the same gradient with alpha = Q, beta = 0.

Both modes: ``ce_rows[r] = logsumexp(s_r) - s_r[y_r]`` where y_r != ignore_index, the gradient
``grad[r] = kl_coef * d kl_rows/ds + ce_coef * (P - onehot(y_r))`` (terms of rows outside kl_mask /
without a label dropped), and rows with neither term get loss 0 and a zero gradient row.
This is ``nn.KLDivLoss`` over the k (+ tail) entries, and exactly the dense loss of
``distil.fused_loss.kl_ce_loss`` when k = V in exact mode; the float64 references are
``distil.reference.topk_kl_ce_rows``.

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

from distil.kernels.kl_ce import tuning_for
from distil.kernels.rows import (
    LN2,
    LOG2E,
    aligned_row,
    chunk_cols,
    fill_row,
    finite_lse,
    load_chunk,
    online_lse_update,
    online_scaled_lse_update,
    rescale_factor,
    row_flags,
    row_geometry,
    row_split,
    row_start,
    store_chunk,
    vector_width,
)

TAIL_FLOOR: tl.constexpr = tl.constexpr(2.0**-16)
# Teacher entries per block: k up to this is one block, larger k is streamed in blocks of it.
MAX_BLOCK_K = 128
# Register cap of every launch. Left to choose, ptxas trades a small spill (4 bytes, outside the loops) for
# one more resident program at 32-48 registers; a cap turns that off. 64 keeps four programs of 8 warps per
# SM, and every specialisation spill-free on Triton 3.6 and 3.8 (tests/test_topk_kl_ce.py).
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
    nothing of the masked chunks stays live across a loop: see kl_ce._row_stats):
    (lse_a, lse_c, ms, log2 z1) with lse_a, lse_c the log2-domain lse of s*log2e/T and of s*log2e, ms
    the row maximum in logit units and z1 = sum exp(s - ms), so that the CE is ln z1 + (ms - s_y):
    the difference first, exact at large logits (ms is kept in logit units for that)."""
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
    log2_z1 = tl.log2(d_c)
    return m_a * scale_t + tl.log2(d_a), m_c * LOG2E + log2_z1, m_c, log2_z1


@triton.jit
def _teacher_block(s_row, t_row, i_row, j0, K, V, scale_t, BLOCK_K: tl.constexpr):
    """Entries j0 .. j0 + BLOCK_K of the row: (b = t*log2e/T, a = s[i]*log2e/T, s[i], i, in range)."""
    j = j0 + tl.arange(0, BLOCK_K)
    valid = j < K
    idx = tl.load(i_row + j, mask=valid, other=0).to(tl.int64)
    ok = valid & (idx >= 0) & (idx < V)
    t = tl.load(t_row + j, mask=valid, other=0.0).to(tl.float32)
    b = tl.where(valid, t * scale_t, float("-inf"))
    s = tl.load(s_row + idx, mask=ok, other=0.0).to(tl.float32)
    return b, s * scale_t, s, idx, ok


@triton.jit
def _teacher_lse(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t, EXACT: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_K_CHUNKS: tl.constexpr):
    """Log2-domain lse_q with q_j = exp2(b_j - lse_q): the given lse, or the k logits' own."""
    if EXACT:
        lse_q = tl.load(lse_ptr + r) * LOG2E
    else:
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.full((), 0.0, tl.float32)
        for c in range(NUM_K_CHUNKS):
            b, _a, _s, _idx, _ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, scale_t, BLOCK_K)
            m, _m_ref, d, _e = online_lse_update(m, d, b)
        lse_q = m + tl.log2(d)
    return lse_q


@triton.jit
def _topk_terms(s_row, t_row, i_row, K, V, scale_t, lse_a, lse_q, EXACT: tl.constexpr, BLOCK_K: tl.constexpr,
                NUM_K_CHUNKS: tl.constexpr):
    """(KL / ln2 of the row, alpha, beta) for finite lse_a, lse_q (see the module docstring)."""
    x = tl.full((), 0.0, tl.float32)  # sum q (log2 q - log2 p)
    big_q = tl.full((), 0.0, tl.float32)
    big_p = tl.full((), 0.0, tl.float32)
    for c in range(NUM_K_CHUNKS):
        b, a, _s, _idx, ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, scale_t, BLOCK_K)
        log_q = b - lse_q
        log_p = a - lse_a
        q = tl.exp2(log_q)
        # xlogy: q_j = 0 contributes 0 (also where the student is -inf there).
        x += tl.sum(tl.where(q > 0, q * (log_q - log_p), 0.0), axis=0)
        big_q += tl.sum(q, axis=0)
        big_p += tl.sum(tl.where(ok, tl.exp2(log_p), 0.0), axis=0)
    beta = big_q * 0.0
    if EXACT:
        q_tail = tl.maximum(1.0 - big_q, TAIL_FLOOR)
        p_raw = 1.0 - big_p
        p_tail = tl.maximum(p_raw, TAIL_FLOOR)
        x += q_tail * (tl.log2(q_tail) - tl.log2(p_tail))
        beta = tl.where(p_raw > TAIL_FLOOR, q_tail / p_tail, 0.0)  # a floored tail has no gradient
    return x, big_q - beta * big_p, beta


@triton.jit
def _dense_grad_chunk(s_vec, g_vec, k, h, V, scale_t, lse_a, lse_c, label, kl_scale, ce_coef, USE_KL, USE_CE,
                      MASKED: tl.constexpr, BLOCK_V: tl.constexpr):
    s = load_chunk(s_vec, k, h, V, 0.0, MASKED, BLOCK_V)
    g = tl.zeros([BLOCK_V], tl.float32)
    if USE_KL:
        g += kl_scale * tl.exp2(s * scale_t - lse_a)
    if USE_CE:
        g += ce_coef * (tl.exp2(s * LOG2E - lse_c) - tl.where(chunk_cols(k, h, BLOCK_V) == label, 1.0, 0.0))
    store_chunk(g_vec, k, h, V, g, MASKED, BLOCK_V)


@triton.jit
def _dense_grad(s_vec, g_vec, h, n, V, scale_t, lse_a, lse_c, label, kl_scale, ce_coef, USE_KL, USE_CE,
                BLOCK_V: tl.constexpr):
    """g = kl_scale * p + ce_coef * (P - onehot(label)) over an ``aligned_row`` in the reverse of the
    statistics pass's order (head, tail, then the interior back to front): the likeliest still cached first."""
    _dense_grad_chunk(s_vec, g_vec, 0, h, V, scale_t, lse_a, lse_c, label, kl_scale, ce_coef, USE_KL, USE_CE, True,
                      BLOCK_V)
    if n > 1:
        _dense_grad_chunk(s_vec, g_vec, n - 1, h, V, scale_t, lse_a, lse_c, label, kl_scale, ce_coef, USE_KL,
                          USE_CE, True, BLOCK_V)
    for j in range(2, n):
        _dense_grad_chunk(s_vec, g_vec, n - j, h, V, scale_t, lse_a, lse_c, label, kl_scale, ce_coef, USE_KL,
                          USE_CE, False, BLOCK_V)


@triton.jit
def _topk_grad(s_row, t_row, i_row, g_row, K, V, scale_t, lse_a, lse_q, lse_c, label, kl_coef, alpha, beta,
               ce_coef, USE_CE, BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """Overwrite the k gradient entries: kl_coef ((alpha + beta) p - q) + ce_coef (P - onehot(label))."""
    for c in range(NUM_K_CHUNKS):
        b, a, s, idx, ok = _teacher_block(s_row, t_row, i_row, c * BLOCK_K, K, V, scale_t, BLOCK_K)
        g = kl_coef * ((alpha + beta) * tl.exp2(a - lse_a) - tl.exp2(b - lse_q))
        if USE_CE:
            g += ce_coef * (tl.exp2(s * LOG2E - lse_c) - tl.where(idx == label, 1.0, 0.0))
        tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def _topk_row(s_row, s_vec, t_row, i_row, lse_ptr, g_row, g_vec, h, n, r, K, V, scale_t, temperature, label, use_kl,
              use_ce, kl_coef, ce_coef, WRITE_GRAD: tl.constexpr, EXACT: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr):
    """(kl, ce) of one row with at least one term; with WRITE_GRAD its gradient for
    (kl_coef, ce_coef) (kl_coef already times T). ``s_row`` / ``g_row`` point at column 0 (the sparse
    accesses), ``s_vec`` / ``g_vec`` at column -h (the ``aligned_row`` streams, n chunks)."""
    lse_a, lse_c, ms, log2_z1 = _student_stats(s_vec, h, n, V, scale_t, use_kl, use_ce, BLOCK_V)
    kl = 0.0
    ce = 0.0
    alpha = 0.0
    beta = 0.0
    lse_q = tl.full((), 0.0, tl.float32)
    # Rows that are -inf everywhere (student, or teacher) have KL 0 and no KL gradient.
    kl_on = use_kl & (lse_a != float("-inf"))
    if kl_on:
        lse_q = _teacher_lse(s_row, t_row, i_row, lse_ptr, r, K, V, scale_t, EXACT, BLOCK_K, NUM_K_CHUNKS)
        kl_on = lse_q != float("-inf")
    if kl_on:
        x, alpha, beta = _topk_terms(s_row, t_row, i_row, K, V, scale_t, lse_a, lse_q, EXACT, BLOCK_K,
                                     NUM_K_CHUNKS)
        kl = temperature * temperature * LN2 * x
    if use_ce:
        in_range = (label >= 0) & (label < V)
        s_y = tl.load(s_row + label, mask=in_range, other=0.0).to(tl.float32)
        ce = tl.where(lse_c == float("-inf"), 0.0, log2_z1 * LN2 + (ms - s_y))
    if WRITE_GRAD:
        kl_coef = tl.where(kl_on, kl_coef, 0.0)
        ce_coef = tl.where(lse_c == float("-inf"), 0.0, ce_coef)
        lse_a = finite_lse(lse_a)
        lse_c = finite_lse(lse_c)
        _dense_grad(s_vec, g_vec, h, n, V, scale_t, lse_a, lse_c, label, kl_coef * alpha, ce_coef, use_kl, use_ce,
                    BLOCK_V)
        if kl_on:
            # The k entries are rewritten by other threads of this program than wrote them densely.
            tl.debug_barrier()
            _topk_grad(s_row, t_row, i_row, g_row, K, V, scale_t, lse_a, lse_q, lse_c, label, kl_coef, alpha, beta,
                       ce_coef, use_ce, BLOCK_K, NUM_K_CHUNKS)
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
    scale_t, temperature, ignore_index,
    EXACT: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, NUM_K_CHUNKS: tl.constexpr,
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
                           label, use_kl, use_ce, tl.load(coef_ptr) * temperature, tl.load(coef_ptr + 1), WRITE_GRAD,
                           EXACT, BLOCK_V, BLOCK_K, NUM_K_CHUNKS)
    elif WRITE_GRAD:
        fill_row(g_vec, h, n, V, 0.0, False, BLOCK_V)
    tl.store(kl_ptr + r, kl)
    tl.store(ce_ptr + r, ce)


@triton.jit
def topk_kl_ce_bwd_kernel(
    s_ptr, t_ptr, i_ptr, lse_ptr, labels_ptr, mask_ptr, coef_ptr, gkl_ptr, gce_ptr, grad_ptr,
    S, s_stride_b, s_stride_s, t_stride_b, t_stride_s, i_stride_b, i_stride_s, V, K,
    scale_t, temperature, ignore_index,
    EXACT: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr,
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
            _topk_row(s_row, s_vec, t_row, i_row, lse_ptr, g_row, g_vec, h, n, r, K, V, scale_t, temperature, label,
                      use_kl, use_ce, g_kl * temperature, g_ce, True, EXACT, BLOCK_V, BLOCK_K, NUM_K_CHUNKS)


def _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, block_v, num_warps,
                 block_k):
    vocab, k = student.shape[-1], values.shape[-1]
    block, warps = tuning_for(vocab)
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
        EXACT=lse is not None, HAS_LABELS=labels is not None, HAS_MASK=kl_mask is not None, BLOCK_V=block_v or block,
        BLOCK_K=block_k, NUM_K_CHUNKS=triton.cdiv(k, block_k),
    )
    return args, dict(num_warps=num_warps or warps, maxnreg=MAXNREG)


def fwd_launch(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows, grad,
               block_v=None, num_warps=None, block_k=None):
    """(grid, {parameter: argument}, launch options) of the forward launch: what :func:`topk_kl_ce_rows`
    launches and what the ahead-of-time tests compile (from meta tensors)."""
    args, options = _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                 block_v, num_warps, block_k)
    args.update(kl_ptr=kl_rows, ce_ptr=ce_rows, grad_ptr=kl_rows if grad is None else grad,
                WRITE_GRAD=grad is not None,
                ALIGN=vector_width(student) if grad is None else vector_width(student, grad))
    return (kl_rows.numel(),), args, options


def bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask, coef, temperature,
               ignore_index, block_v=None, num_warps=None, block_k=None):
    """(grid, {parameter: argument}, launch options) of the backward launch (see :func:`fwd_launch`)."""
    args, options = _common_args(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                 block_v, num_warps, block_k)
    args.update(gkl_ptr=grad_kl_rows, gce_ptr=grad_ce_rows, grad_ptr=grad, ALIGN=vector_width(student, grad))
    return (grad_kl_rows.numel(),), args, options


def topk_kl_ce_rows(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows,
                    grad, block_v=None, num_warps=None, block_k=None):
    """Launch :func:`topk_kl_ce_fwd_kernel` into the caller's ``kl_rows``, ``ce_rows`` (fp32, contiguous,
    one value per row) and ``grad`` (contiguous, the student's shape and dtype; ``None``: no gradient).

    ``values`` / ``index``: ``[..., k]`` over the student's row dims, unit stride along k; ``lse`` (fp32),
    ``labels`` (int64), ``kl_mask`` (bool): contiguous over the row dims or ``None``; ``coef``: the fp32
    ``[kl_coef, ce_coef]`` device tensor. Inputs are validated by the callers (distil._ops.topk_kl_ce).
    ``block_v`` / ``num_warps`` / ``block_k`` override the tuning (tests force chunking with them)."""
    if student.shape[-1] == 0:
        kl_rows.zero_()
        ce_rows.zero_()
    if kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = fwd_launch(student, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
                                     kl_rows, ce_rows, grad, block_v, num_warps, block_k)
    topk_kl_ce_fwd_kernel[grid](**args, **options)


def topk_kl_ce_rows_backward(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask, coef,
                             temperature, ignore_index, block_v=None, num_warps=None, block_k=None):
    """Launch :func:`topk_kl_ce_bwd_kernel`: rewrites ``grad`` in place for the incoming per-row gradients
    (fp32, contiguous); see the module docstring."""
    if grad_kl_rows.numel() == 0 or student.shape[-1] == 0:
        return
    grid, args, options = bwd_launch(grad, grad_kl_rows, grad_ce_rows, student, values, index, lse, labels, kl_mask,
                                     coef, temperature, ignore_index, block_v, num_warps, block_k)
    topk_kl_ce_bwd_kernel[grid](**args, **options)
