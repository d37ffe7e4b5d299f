"""Triton helpers shared by every row-wise kernel: row addressing, the online log-sum-exp, the KL+CE row
kernels' vocabulary tuning and their cancellation-free ``exp2_difference`` / ``log1p``.

Row convention (the one every kernel and launcher uses): a kernel reads flat row ``r`` of an
``[N, D]`` or ``[B, S, D]`` tensor with a unit stride along D at element offset
``row_start(r, S, stride_b, stride_s)``, computed in int64 (so tensors past 2**31 elements work);
``row_geometry(x)`` gives those three numbers: ``[B, S, D]`` is ``(S, x.stride(0), x.stride(1))``
and ``[N, D]`` is ``(1, x.stride(0), 0)`` (Triton specialises the integer 1, so the division
folds away). Strided views (padded D, a transposed batch) are read in place, never copied.
Outputs written by the kernels (per-row values, gradients) are contiguous: row ``r`` of an
``[n, D]`` output starts at ``r * D``.
"""
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# How the KL+CE row kernels (kl_ce, topk_kl_ce) cut a vocabulary: (max V, BLOCK_V, num_warps) rows, the first
# whose max V covers it is used. Up to 1024 a row is one block (a second pass re-reads it from L1); above, it is
# streamed in chunks of BLOCK_V.
# History: measured on an H100 (N=8192, V=30522, benchmarks/results/loss_cuda_h100-80gb-hbm3.json),
# 4096 x 16 ran fp32 at 42% of copy bandwidth, and bf16 in the same 2.0 ms as fp32, latency-bound:
# its program needs 102 registers, so one program (row) per SM; in fp32 without a KL mask it also
# spilled. 2048 x 8 keeps 8 elements per thread (each kernel's register cap: its launch options). It awaits a
# GPU re-measurement (benchmarks/tune_kl_ce.py sweeps the alternatives).
TUNING = (
    (1024, None, 4),
    (None, 2048, 8),
)


def tuning_for(vocab):
    """(BLOCK_V, num_warps, streamed) for a vocabulary size, from TUNING: ``streamed`` when the row is cut into
    chunks of BLOCK_V, else BLOCK_V is the one block covering it."""
    for max_v, block, warps in TUNING:
        if max_v is None or vocab <= max_v:
            return block or max(triton.next_power_of_2(vocab), 16), warps, block is not None
    raise AssertionError("TUNING must end with a catch-all row")


def row_geometry(x):
    """(S, stride_b, stride_s) of a 2-D or 3-D tensor for :func:`row_start`."""
    if x.dim() == 2:
        return 1, x.stride(0), 0
    return x.shape[1], x.stride(0), x.stride(1)


@triton.jit
def row_start(r, S, stride_b, stride_s):
    """Element offset of flat row r = b * S + s (r an int64 scalar or block)."""
    b = r // S
    return b * stride_b + (r - b * S) * stride_s


@triton.jit
def online_lse_update(m, d, x):
    """Fold a chunk ``x`` (log2 domain, -inf for absent entries) into a running (max m, sum d) of
    exp2(x - m). Returns (new max, the finite reference it used, new sum, exp2(x - reference))."""
    return online_scaled_lse_update(m, d, x, 1.0)


@triton.jit
def online_scaled_lse_update(m, d, x, scale):
    """:func:`online_lse_update` of ``x * scale`` with the max kept in x's own units: the exponents are
    ``(x - max) * scale``, the difference taken first, so large logits (1e4, 1e6) lose nothing to the
    rounding of ``x * scale``. Returns (new max of x, its finite reference, new sum, exp2((x - ref) * scale))."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2((x - m_ref) * scale)
    d = d * tl.exp2((m - m_ref) * scale) + tl.sum(e, axis=0)
    return m_new, m_ref, d, e


@triton.jit
def finite_lse(lse):
    """A row that is -inf everywhere has lse = -inf; 0 instead makes its probabilities 0, not nan."""
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def exp2_difference(p, q, z):
    """p - q for p = q * 2**z, without the cancellation of p - q near z = 0 (e^y - 1, y = z ln 2, as its
    Taylor series to y^6 for |z| <= 1/4: < 5e-8 relative); -inf/nan z take p - q."""
    y = z * LN2
    em1 = y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))))
    return tl.where(tl.abs(z) <= 0.25, q * em1, p - q)


@triton.jit
def log1p(x):
    # log(1 + x) accurate near 0: log(u) * x / (u - 1) for the rounded u = 1 + x (Goldberg).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def row_flags(r, labels_ptr, mask_ptr, ignore_index, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr):
    """(use_kl, use_ce, label) of row r of the KL+CE losses: its kl_mask entry (True without a mask)
    and whether it has a label other than ignore_index (-1 without labels)."""
    if HAS_MASK:
        use_kl = tl.load(mask_ptr + r) != 0
    else:
        use_kl = r >= 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + r)
        use_ce = label != ignore_index
    else:
        label = r * 0 - 1
        use_ce = r < 0
    return use_kl, use_ce, label


# ------------------------------------------------------------------------------------------------
# 128-bit access at any row length and row stride.
#
# A masked access (`cols < V` on every chunk) compiles to one scalar load per element unless the
# compiler can prove that the mask is constant over 16-byte groups, which it cannot for V = 30522
# (BERT) or 50257 (GPT-2): 8 (bf16) or 4 (fp32) times the memory instructions the bytes need.
# So a row is cut at 16-byte boundaries instead: with h = (row offset) mod ALIGN, chunk k covers
# columns [k*BLOCK - h, (k+1)*BLOCK - h), which start 16 bytes aligned (given a 16-byte aligned base
# pointer, as every allocation is). Chunk 0 (the head, from column -h) and chunk n-1 (the tail) are
# masked; chunks 1 .. n-2 lie inside the row, so they are loaded and stored without a mask, and
# `tl.multiple_of` tells the compiler their alignment: 128-bit accesses. ALIGN is the number of
# elements in 16 bytes of the narrowest dtype among the row tensors a program addresses at the same
# columns (`vector_width`); 1 when their rows are not congruent, which falls back to plain chunks.
# ------------------------------------------------------------------------------------------------
def vector_width(*tensors):
    """ALIGN for tensors whose row r a program reads / writes at the same columns: the elements in 16
    bytes of the narrowest dtype, when every tensor's rows start at the same offset modulo that
    (row strides congruent modulo it, as for contiguous tensors of one shape); else 1."""
    align = 16 // min(t.element_size() for t in tensors)
    _, ref_b, ref_s = row_geometry(tensors[0])
    for t in tensors[1:]:
        _, stride_b, stride_s = row_geometry(t)
        if (stride_b - ref_b) % align or (stride_s - ref_s) % align:
            return 1
    return align


@triton.jit
def row_split(off, V, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """(h, n): the row at element offset ``off`` is chunked from column -h, n chunks of BLOCK."""
    h = (off % ALIGN).to(tl.int32)  # int32 column arithmetic keeps the per-element offsets in one register
    return h, tl.cdiv(V + h, BLOCK)


@triton.jit
def aligned_row(ptr, off, h, ALIGN: tl.constexpr):
    """Pointer to column -h of the row at ``off``: 16-byte aligned when ``ptr`` is."""
    return ptr + tl.multiple_of(off - h, ALIGN)


@triton.jit
def chunk_cols(k, h, BLOCK: tl.constexpr):
    """Column indices of chunk k (negative in the head, >= V in the tail)."""
    return k * BLOCK - h + tl.arange(0, BLOCK)


@triton.jit
def load_chunk(row, k, h, V, other, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk k of an ``aligned_row`` in fp32; outside the row (MASKED chunks only) it reads ``other``."""
    offs = k * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        cols = offs - h
        valid = (cols >= 0) & (cols < V)
        return tl.load(row + offs, mask=valid, other=other).to(tl.float32)
    else:
        return tl.load(row + offs).to(tl.float32)


@triton.jit
def store_chunk(row, k, h, V, x, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Store ``x`` (converted to the row's dtype) into chunk k of an ``aligned_row``."""
    offs = k * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        cols = offs - h
        tl.store(row + offs, x.to(row.dtype.element_ty), mask=(cols >= 0) & (cols < V))
    else:
        tl.store(row + offs, x.to(row.dtype.element_ty))


@triton.jit
def rescale_keeps_precision(factor, NARROW: tl.constexpr):
    """Whether a backward may rescale a gradient row the forward wrote by ``factor`` instead of
    recomputing it: always in fp32 (one more rounding); in a 16-bit row only by a factor in [1/2, 2],
    as a farther one (a loss scale, 1/grad_accum) would carry the forward's rounding, fp16's underflow
    of small entries included, into the gradient. The CPU kernels use the same rule (csrc/rows.h)."""
    if NARROW:
        return (tl.abs(factor) >= 0.5) & (tl.abs(factor) <= 2.0)
    else:
        return factor == factor  # true (false for a NaN factor, which a recomputation makes NaN too)


@triton.jit
def rescale_factor(r, coef_ptr, gkl_ptr, gce_ptr, use_kl, use_ce, NARROW: tl.constexpr):
    """The backward of the two-part (KL, CE) row ops, whose forward wrote the gradient of
    kl_coef * kl_row + ce_coef * ce_row: (factor, rescale, g_kl, g_ce) for row r. ``rescale``: the
    incoming (g_kl, g_ce) are proportional to the coefficients (1e-6 relative; parts the row does not
    use are absent) and ``rescale_keeps_precision``, so the row is multiplied by ``factor`` (nothing to
    do at exactly 1); otherwise the row must be recomputed for (g_kl, g_ce). csrc/rows.h has the CPU twin."""
    kl_coef = tl.load(coef_ptr)
    ce_coef = tl.load(coef_ptr + 1)
    g_kl = tl.load(gkl_ptr + r)
    g_ce = tl.load(gce_ptr + r)
    kl_ok = (use_kl == 0) | (kl_coef != 0.0)
    ce_ok = (use_ce == 0) | (ce_coef != 0.0)
    lhs = g_kl * ce_coef
    rhs = g_ce * kl_coef
    prop = ((use_kl & use_ce) == 0) | (tl.abs(lhs - rhs) <= 1e-6 * tl.maximum(tl.abs(lhs), tl.abs(rhs)))
    factor = tl.where(use_kl, g_kl / tl.where(kl_coef == 0.0, 1.0, kl_coef),
                      g_ce / tl.where(ce_coef == 0.0, 1.0, ce_coef))
    return factor, kl_ok & ce_ok & prop & rescale_keeps_precision(factor, NARROW), g_kl, g_ce


@triton.jit
def fill_row(g_row, h, n, V, factor, SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Every chunk of an ``aligned_row`` set to 0 (SCALE false) or multiplied by ``factor`` (SCALE true)."""
    zero = tl.zeros([BLOCK_V], tl.float32)
    if SCALE:
        store_chunk(g_row, 0, h, V, load_chunk(g_row, 0, h, V, 0.0, True, BLOCK_V) * factor, True, BLOCK_V)
    else:
        store_chunk(g_row, 0, h, V, zero, True, BLOCK_V)
    for k in range(1, n - 1):
        if SCALE:
            store_chunk(g_row, k, h, V, load_chunk(g_row, k, h, V, 0.0, False, BLOCK_V) * factor, False, BLOCK_V)
        else:
            store_chunk(g_row, k, h, V, zero, False, BLOCK_V)
    if n > 1:
        if SCALE:
            store_chunk(g_row, n - 1, h, V, load_chunk(g_row, n - 1, h, V, 0.0, True, BLOCK_V) * factor, True,
                        BLOCK_V)
        else:
            store_chunk(g_row, n - 1, h, V, zero, True, BLOCK_V)
