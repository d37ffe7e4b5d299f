"""Triton kernels for ``distil::cosine_rows`` and ``distil::cosine_rows_backward``.

Per row r of the student ``x`` and teacher ``y`` (``[N, H]`` or ``[B, S, H]``, any float dtype,
last-dim stride 1, other strides arbitrary), with exactly ``nn.CosineEmbeddingLoss``'s target +1
math in fp32::

    a = Σx² + 1e-12,  b = Σy² + 1e-12,  d = sqrt(a·b),  cos = Σxy / d
    loss[r] = 1 − cos                      (0 where mask is False)
    dx[r]   = coef · (cos/a · x − y/d)     (= coef · d(1 − cos)/dx; 0 where mask is False)

Traffic model (the kernel is memory bound): for H ≤ the table's largest block the forward reads
x and y once and writes dx once: (2·itemsize_in + itemsize_x)·N·H bytes; masked-out rows are
neither read nor written beyond their zero gradient.  Above it (H > 8192) a row is
streamed twice (sums, then gradient), the second read mostly from L2.  The backward reads and
writes nothing for rows whose incoming gradient equals ``coef`` (the usual ``loss.backward()``),
reads and writes dx once for the other rows, and re-reads x and y (recomputes) only where ``coef`` is 0
or a 16-bit dx would lose precision to the rescale (factor outside [1/2, 2]: rows.rescale_keeps_precision).

Rows follow the convention of kernels/rows.py (a ``[B, S, H]`` view with padding or a transposed
batch is read in place). The backward leaves ``dx`` as it is where the incoming gradient equals
``coef`` exactly. Launchers write into caller-allocated outputs. The CPU twin is csrc/cosine.cpp;
the float64 reference distil.reference.cosine_rows.
"""
import torch
import triton
import triton.language as tl

from distil.kernels.rows import rescale_keeps_precision, row_geometry, row_start

# Tuning table keyed by H: (largest H, ROWS per program, num_warps); BLOCK_H is H rounded up to a
# power of two.  Small H packs several rows into one [ROWS, BLOCK_H] tile of about 1K elements per
# tensor (larger tiles spill in the backward on sm_80); from 2K on one row per program, with warps
# growing with H so each thread keeps 16 elements of x and of y.
TUNING = (
    (16, 64, 4),
    (64, 16, 4),
    (256, 4, 4),
    (512, 2, 4),
    (1024, 2, 4),
    (2048, 1, 4),
    (4096, 1, 8),
    (8192, 1, 16),
)
CHUNK_H = 4096  # above the table a row is streamed in chunks of this size (not held in registers)


def tuning_for(h):
    """(BLOCK_H, ROWS, num_warps) for hidden size ``h``; ``h > BLOCK_H`` means chunked rows."""
    for max_h, rows, warps in TUNING:
        if h <= max_h:
            return triton.next_power_of_2(max(h, 1)), rows, warps
    return CHUNK_H, 1, 8


def bwd_tuning_for(h):
    """The backward streams rows in chunks anyway, so it caps the chunk at CHUNK_H (the 8192-wide
    single-pass tile would spill there on sm_80)."""
    block_h, rows, warps = tuning_for(h)
    return min(block_h, CHUNK_H), rows, min(warps, 8)


@triton.jit
def _program_rows(pid, n_rows, S, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr):
    """This program's rows: (rows, in_range, live = in range and selected, x offsets, y offsets), int64."""
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_range = rows < n_rows
    live = in_range
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    return rows, in_range, live, row_start(rows, S, sx_b, sx_s), row_start(rows, S, sy_b, sy_s)


@triton.jit
def _row_sums(x_ptr, y_ptr, x_off, y_off, live, H, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    """Σxy, Σx², Σy² per row, in fp32, streaming the row in BLOCK_H chunks."""
    cols = tl.arange(0, BLOCK_H)
    sxy = tl.zeros([ROWS, BLOCK_H], tl.float32)
    sxx = tl.zeros([ROWS, BLOCK_H], tl.float32)
    syy = tl.zeros([ROWS, BLOCK_H], tl.float32)
    for start in range(0, H, BLOCK_H):
        c = start + cols
        m = live[:, None] & (c < H)[None, :]
        x = tl.load(x_ptr + x_off[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_off[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        sxy += x * y
        sxx += x * x
        syy += y * y
    return tl.sum(sxy, 1), tl.sum(sxx, 1), tl.sum(syy, 1)


@triton.jit
def _cosine_terms(sxy, sxx, syy):
    """cos and the two per-row factors of d(1 − cos)/dx = k_x·x − k_y·y."""
    a = sxx + 1e-12  # nn.CosineEmbeddingLoss's epsilon on each squared norm (not a clamp)
    d = tl.sqrt_rn(a * (syy + 1e-12))
    cos = sxy / d
    return cos, cos / a, 1.0 / d


@triton.jit
def cosine_fwd_kernel(
    x_ptr, y_ptr, mask_ptr, coef_ptr, loss_ptr, dx_ptr,
    n_rows, S, H, sx_b, sx_s, sy_b, sy_s,
    HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    rows, in_range, live, x_off, y_off = _program_rows(
        tl.program_id(0), n_rows, S, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK, ROWS
    )
    cols = tl.arange(0, BLOCK_H)
    if SINGLE:
        # Whole row in registers: x and y are read exactly once.
        m = live[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_off[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        cos, kx, ky = _cosine_terms(tl.sum(x * y, 1), tl.sum(x * x, 1), tl.sum(y * y, 1))
    else:
        sxy, sxx, syy = _row_sums(x_ptr, y_ptr, x_off, y_off, live, H, BLOCK_H, ROWS)
        cos, kx, ky = _cosine_terms(sxy, sxx, syy)
    tl.store(loss_ptr + rows, tl.where(live, 1.0 - cos, 0.0), mask=in_range)
    if COMPUTE_GRAD:
        coef = tl.load(coef_ptr)
        kx = tl.where(live, coef * kx, 0.0)[:, None]
        ky = tl.where(live, coef * ky, 0.0)[:, None]
        dx_row = rows * H
        if SINGLE:
            m = in_range[:, None] & (cols < H)[None, :]
            tl.store(dx_ptr + dx_row[:, None] + cols[None, :], (kx * x - ky * y).to(dx_ptr.dtype.element_ty), mask=m)
        else:
            for start in range(0, H, BLOCK_H):
                c = start + cols
                m = in_range[:, None] & (c < H)[None, :]
                lm = m & live[:, None]
                x = tl.load(x_ptr + x_off[:, None] + c[None, :], mask=lm, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + y_off[:, None] + c[None, :], mask=lm, other=0.0).to(tl.float32)
                tl.store(dx_ptr + dx_row[:, None] + c[None, :], (kx * x - ky * y).to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def cosine_bwd_kernel(
    dx_ptr, g_ptr, x_ptr, y_ptr, mask_ptr, coef_ptr,
    n_rows, S, H, sx_b, sx_s, sy_b, sy_s,
    HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
):
    rows, in_range, live, x_off, y_off = _program_rows(
        tl.program_id(0), n_rows, S, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK, ROWS
    )
    coef = tl.zeros([ROWS], tl.float32) + tl.load(coef_ptr)  # per row, so masks combine elementwise
    g = tl.load(g_ptr + rows, mask=live, other=0.0).to(tl.float32)
    # dx holds coef·d(1 − cos)/dx: rescale it by g/coef (skip rows where that is exactly 1) where that
    # keeps the dtype's precision; a zero coef left nothing to rescale: those rows, and rows whose
    # factor is too far from 1 for a 16-bit dx, are recomputed from x and y.
    ratio = g / tl.where(coef != 0.0, coef, 1.0)
    rescalable = (coef != 0.0) & rescale_keeps_precision(ratio, dx_ptr.dtype.element_ty != tl.float32)
    rescale = live & rescalable & (ratio != 1.0)
    recompute = live & ~rescalable
    # Fully masked loads when no row recomputes: no memory traffic.
    sxy, sxx, syy = _row_sums(x_ptr, y_ptr, x_off, y_off, recompute, H, BLOCK_H, ROWS)
    _, kx, ky = _cosine_terms(sxy, sxx, syy)
    kx = (g * kx)[:, None]
    ky = (g * ky)[:, None]
    cols = tl.arange(0, BLOCK_H)
    dx_row = rows * H
    for start in range(0, H, BLOCK_H):
        c = start + cols
        col_ok = (c < H)[None, :]
        ms = rescale[:, None] & col_ok
        mr = recompute[:, None] & col_ok
        old = tl.load(dx_ptr + dx_row[:, None] + c[None, :], mask=ms, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + x_off[:, None] + c[None, :], mask=mr, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_off[:, None] + c[None, :], mask=mr, other=0.0).to(tl.float32)
        new = tl.where(recompute[:, None], kx * x - ky * y, old * ratio[:, None])
        tl.store(dx_ptr + dx_row[:, None] + c[None, :], new.to(dx_ptr.dtype.element_ty), mask=ms | mr)


def _launch_args(student, teacher, mask):
    S, sx_b, sx_s = row_geometry(student)
    _, sy_b, sy_s = row_geometry(teacher)
    mask_arg = student if mask is None else mask.reshape(-1).view(torch.uint8)
    return mask_arg, (student.shape[:-1].numel(), S, student.shape[-1], sx_b, sx_s, sy_b, sy_s)


def cosine_rows(student, teacher, mask, coef, loss_rows, grad):
    """Launch :func:`cosine_fwd_kernel` into the caller's ``loss_rows`` (fp32, contiguous, one value
    per row) and ``grad`` (contiguous, the student's shape and dtype; ``None``: no gradient).
    ``mask`` is a contiguous bool over the row dims or ``None``; ``coef`` a 1-element fp32 tensor."""
    mask_arg, geo = _launch_args(student, teacher, mask)
    if geo[0] == 0:
        return
    block_h, rows, warps = tuning_for(geo[2])
    cosine_fwd_kernel[(triton.cdiv(geo[0], rows),)](
        student, teacher, mask_arg, coef, loss_rows, student if grad is None else grad, *geo,
        HAS_MASK=mask is not None, COMPUTE_GRAD=grad is not None, SINGLE=geo[2] <= block_h,
        BLOCK_H=block_h, ROWS=rows, num_warps=warps,
    )


def cosine_rows_backward(grad, grad_rows, student, teacher, mask, coef):
    """Launch :func:`cosine_bwd_kernel`: rewrites ``grad`` (made by the forward for ``coef``) in place
    into the gradient for the incoming per-row gradients ``grad_rows`` (fp32, contiguous)."""
    mask_arg, geo = _launch_args(student, teacher, mask)
    if geo[0] == 0:
        return
    block_h, rows, warps = bwd_tuning_for(geo[2])
    cosine_bwd_kernel[(triton.cdiv(geo[0], rows),)](
        grad, grad_rows, student, teacher, mask_arg, coef, *geo,
        HAS_MASK=mask is not None, BLOCK_H=block_h, ROWS=rows, num_warps=warps,
    )
