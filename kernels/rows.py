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
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2(x - m_ref)
    d = d * tl.exp2(m - m_ref) + tl.sum(e, axis=0)
    return m_new, m_ref, d, e


@triton.jit
def finite_lse(lse):
    """A row that is -inf everywhere has lse = -inf; 0 instead makes its probabilities 0, not nan."""
    return tl.where(lse == float("-inf"), 0.0, lse)


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
