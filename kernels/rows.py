"""Triton helpers shared by every row-wise kernel: row addressing and the online log-sum-exp.

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
def rescale_keeps_precision(factor, NARROW: tl.constexpr):
    """Whether a backward may rescale a gradient row the forward wrote by ``factor`` instead of
    recomputing it: always in fp32 (one more rounding); in a 16-bit row only by a factor in [1/2, 2],
    as a farther one (a loss scale, 1/grad_accum) would carry the forward's rounding, fp16's underflow
    of small entries included, into the gradient. The CPU kernels use the same rule (csrc/rows.h)."""
    if NARROW:
        return (tl.abs(factor) >= 0.5) & (tl.abs(factor) <= 2.0)
    else:
        return factor == factor  # true (false for a NaN factor, which a recomputation makes NaN too)
