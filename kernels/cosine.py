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

Instruction model (memory instructions per thread, per row and tensor): the whole-row tile (H up to
8192 in the forward) is one masked access per element group; it is 128-bit exactly when H and the
row strides are multiples of 16 (H = 768, 1024, 4096: the usual hidden sizes), scalar otherwise. The
streamed rows (CHUNK_H = 4096 x 8 warps: 16 elements per thread and chunk) are cut at 16-byte
boundaries (kernels/rows.py): 48 scalar accesses in the masked head and two tail chunks plus
(H // 4096 - 1) * 16 * e / 16 128-bit ones (H = 30522: 60 in bf16, 72 in fp32). tests/test_ops.py
asserts 128-bit main loops from the sm_80 / sm_90 PTX at H in {30522, 50257, 32000, 128256}.

Rows follow the convention of kernels/rows.py (a ``[B, S, H]`` view with padding or a transposed
batch is read in place). The backward leaves ``dx`` as it is where the incoming gradient equals
``coef`` exactly. Launchers write into caller-allocated outputs. The CPU twin is csrc/cosine.cpp;
the float64 reference distil.reference.cosine_rows.
"""
import torch
import triton
import triton.language as tl

from distil.kernels.rows import rescale_keeps_precision, row_geometry, row_start, vector_width

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


def launch_options(streamed, num_warps):
    """Triton launch options: rows streamed in CHUNK_H chunks (masked head and tail beside the
    unmasked interior) take ptxas to 150-170 registers on sm_80 unless capped; 128 keeps two
    programs per SM with 0 spills."""
    return {"num_warps": num_warps, "maxnreg": 128 if streamed else None}


@triton.jit
def _program_rows(pid, n_rows, S, H, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK: tl.constexpr,
                  ROWS: tl.constexpr, ALIGN: tl.constexpr):
    """This program's rows: (rows, in_range, live = in range and selected, h, and the offsets of column -h
    of x, y and dx), int64 offsets; rows are cut at 16-byte boundaries as in kernels/rows.py."""
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_range = rows < n_rows
    live = in_range
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    x_off = row_start(rows, S, sx_b, sx_s)
    h = (x_off % ALIGN).to(tl.int32)
    x_base = tl.multiple_of(x_off - h, ALIGN)
    y_base = tl.multiple_of(row_start(rows, S, sy_b, sy_s) - h, ALIGN)
    dx_base = tl.multiple_of(rows * H - h, ALIGN)
    return rows, in_range, live, h, x_base, y_base, dx_base


@triton.jit
def _tile(k, h, H, base, EDGE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Offsets of chunk k of each row (from its column -h) and, for EDGE chunks, which of them are
    columns of the row; interior chunks need no column mask (see _chunks)."""
    offs = k * BLOCK_H + tl.arange(0, BLOCK_H)
    if EDGE:
        cols = offs[None, :] - h[:, None]
        return base[:, None] + offs[None, :], (cols >= 0) & (cols < H)
    else:
        return base[:, None] + offs[None, :], tl.full([1, BLOCK_H], True, tl.int1)


@triton.jit
def _chunks(H, BLOCK_H: tl.constexpr, ALIGN: tl.constexpr):
    """Chunks of rows cut at column -h (h < ALIGN): 0 is the head, 1 .. H // BLOCK_H - 1 lie inside every
    row (unmasked, aligned: 128-bit accesses), k1 and k1 + 1 are the tail (each present when < n)."""
    k1 = tl.maximum(H // BLOCK_H, 1)
    return k1, tl.cdiv(H + ALIGN - 1, BLOCK_H)


@triton.jit
def _sums_chunk(x_ptr, y_ptr, x_base, y_base, k, h, H, live, sxy, sxx, syy, EDGE: tl.constexpr,
                BLOCK_H: tl.constexpr):
    x_offs, cols_ok = _tile(k, h, H, x_base, EDGE, BLOCK_H)
    y_offs, _ = _tile(k, h, H, y_base, EDGE, BLOCK_H)
    m = live[:, None] & cols_ok
    x = tl.load(x_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
    return sxy + x * y, sxx + x * x, syy + y * y


@triton.jit
def _row_sums(x_ptr, y_ptr, x_base, y_base, h, live, H, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
              ALIGN: tl.constexpr):
    """Σxy, Σx², Σy² per row, in fp32, streaming the row in BLOCK_H chunks."""
    sxy = tl.zeros([ROWS, BLOCK_H], tl.float32)
    sxx = tl.zeros([ROWS, BLOCK_H], tl.float32)
    syy = tl.zeros([ROWS, BLOCK_H], tl.float32)
    k1, n = _chunks(H, BLOCK_H, ALIGN)
    sxy, sxx, syy = _sums_chunk(x_ptr, y_ptr, x_base, y_base, 0, h, H, live, sxy, sxx, syy, True, BLOCK_H)
    for k in range(1, H // BLOCK_H):
        sxy, sxx, syy = _sums_chunk(x_ptr, y_ptr, x_base, y_base, k, h, H, live, sxy, sxx, syy, False, BLOCK_H)
    if k1 < n:
        sxy, sxx, syy = _sums_chunk(x_ptr, y_ptr, x_base, y_base, k1, h, H, live, sxy, sxx, syy, True, BLOCK_H)
    if k1 + 1 < n:
        sxy, sxx, syy = _sums_chunk(x_ptr, y_ptr, x_base, y_base, k1 + 1, h, H, live, sxy, sxx, syy, True,
                                    BLOCK_H)
    return tl.sum(sxy, 1), tl.sum(sxx, 1), tl.sum(syy, 1)


@triton.jit
def _cosine_terms(sxy, sxx, syy):
    """cos and the two per-row factors of d(1 − cos)/dx = k_x·x − k_y·y."""
    a = sxx + 1e-12  # nn.CosineEmbeddingLoss's epsilon on each squared norm (not a clamp)
    d = tl.sqrt_rn(a * (syy + 1e-12))
    cos = sxy / d
    return cos, cos / a, 1.0 / d


@triton.jit
def _grad_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k, h, H, in_range, live, kx, ky,
                EDGE: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx = kx·x − ky·y over chunk k of the rows in range (zeros where not live)."""
    x_offs, cols_ok = _tile(k, h, H, x_base, EDGE, BLOCK_H)
    y_offs, _ = _tile(k, h, H, y_base, EDGE, BLOCK_H)
    dx_offs, _ = _tile(k, h, H, dx_base, EDGE, BLOCK_H)
    m = in_range[:, None] & cols_ok
    lm = m & live[:, None]
    x = tl.load(x_ptr + x_offs, mask=lm, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_offs, mask=lm, other=0.0).to(tl.float32)
    tl.store(dx_ptr + dx_offs, (kx * x - ky * y).to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def cosine_fwd_kernel(
    x_ptr, y_ptr, mask_ptr, coef_ptr, loss_ptr, dx_ptr,
    n_rows, S, H, sx_b, sx_s, sy_b, sy_s,
    HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ALIGN: tl.constexpr,
):
    # SINGLE: the whole row is one tile at column 0 (ALIGN is 1 there: no head to cut).
    rows, in_range, live, h, x_base, y_base, dx_base = _program_rows(
        tl.program_id(0), n_rows, S, H, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK, ROWS, ALIGN
    )
    cols = tl.arange(0, BLOCK_H)
    if SINGLE:
        # Whole row in registers: x and y are read exactly once.
        m = live[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + x_base[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + y_base[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        cos, kx, ky = _cosine_terms(tl.sum(x * y, 1), tl.sum(x * x, 1), tl.sum(y * y, 1))
    else:
        sxy, sxx, syy = _row_sums(x_ptr, y_ptr, x_base, y_base, h, live, H, BLOCK_H, ROWS, ALIGN)
        cos, kx, ky = _cosine_terms(sxy, sxx, syy)
    tl.store(loss_ptr + rows, tl.where(live, 1.0 - cos, 0.0), mask=in_range)
    if COMPUTE_GRAD:
        coef = tl.load(coef_ptr)
        kx = tl.where(live, coef * kx, 0.0)[:, None]
        ky = tl.where(live, coef * ky, 0.0)[:, None]
        if SINGLE:
            m = in_range[:, None] & (cols < H)[None, :]
            tl.store(dx_ptr + dx_base[:, None] + cols[None, :], (kx * x - ky * y).to(dx_ptr.dtype.element_ty),
                     mask=m)
        else:
            k1, n = _chunks(H, BLOCK_H, ALIGN)
            _grad_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, 0, h, H, in_range, live, kx, ky, True,
                        BLOCK_H)
            for k in range(1, H // BLOCK_H):
                _grad_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k, h, H, in_range, live, kx, ky, False,
                            BLOCK_H)
            if k1 < n:
                _grad_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k1, h, H, in_range, live, kx, ky, True,
                            BLOCK_H)
            if k1 + 1 < n:
                _grad_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k1 + 1, h, H, in_range, live, kx, ky,
                            True, BLOCK_H)


@triton.jit
def _bwd_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k, h, H, rescale, recompute, ratio, kx, ky,
               EDGE: tl.constexpr, BLOCK_H: tl.constexpr):
    x_offs, cols_ok = _tile(k, h, H, x_base, EDGE, BLOCK_H)
    y_offs, _ = _tile(k, h, H, y_base, EDGE, BLOCK_H)
    dx_offs, _ = _tile(k, h, H, dx_base, EDGE, BLOCK_H)
    ms = rescale[:, None] & cols_ok
    mr = recompute[:, None] & cols_ok
    old = tl.load(dx_ptr + dx_offs, mask=ms, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + x_offs, mask=mr, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + y_offs, mask=mr, other=0.0).to(tl.float32)
    new = tl.where(recompute[:, None], kx * x - ky * y, old * ratio[:, None])
    tl.store(dx_ptr + dx_offs, new.to(dx_ptr.dtype.element_ty), mask=ms | mr)


@triton.jit
def cosine_bwd_kernel(
    dx_ptr, g_ptr, x_ptr, y_ptr, mask_ptr, coef_ptr,
    n_rows, S, H, sx_b, sx_s, sy_b, sy_s,
    HAS_MASK: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ALIGN: tl.constexpr,
):
    rows, in_range, live, h, x_base, y_base, dx_base = _program_rows(
        tl.program_id(0), n_rows, S, H, sx_b, sx_s, sy_b, sy_s, mask_ptr, HAS_MASK, ROWS, ALIGN
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
    sxy, sxx, syy = _row_sums(x_ptr, y_ptr, x_base, y_base, h, recompute, H, BLOCK_H, ROWS, ALIGN)
    _, kx, ky = _cosine_terms(sxy, sxx, syy)
    kx = (g * kx)[:, None]
    ky = (g * ky)[:, None]
    k1, n = _chunks(H, BLOCK_H, ALIGN)
    _bwd_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, 0, h, H, rescale, recompute, ratio, kx, ky, True,
               BLOCK_H)
    for k in range(1, H // BLOCK_H):
        _bwd_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k, h, H, rescale, recompute, ratio, kx, ky,
                   False, BLOCK_H)
    if k1 < n:
        _bwd_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k1, h, H, rescale, recompute, ratio, kx, ky,
                   True, BLOCK_H)
    if k1 + 1 < n:
        _bwd_chunk(x_ptr, y_ptr, dx_ptr, x_base, y_base, dx_base, k1 + 1, h, H, rescale, recompute, ratio, kx,
                   ky, True, BLOCK_H)


def _common_args(student, teacher, mask, coef):
    S, sx_b, sx_s = row_geometry(student)
    _, sy_b, sy_s = row_geometry(teacher)
    return dict(x_ptr=student, y_ptr=teacher, mask_ptr=student if mask is None else mask.reshape(-1).view(torch.uint8),
                coef_ptr=coef, n_rows=student.shape[:-1].numel(), S=S, H=student.shape[-1], sx_b=sx_b, sx_s=sx_s,
                sy_b=sy_b, sy_s=sy_s, HAS_MASK=mask is not None)


def fwd_launch(student, teacher, mask, coef, loss_rows, grad):
    """(grid, {parameter: argument}, launch options) of the forward launch: what :func:`cosine_rows` launches
    and what the ahead-of-time tests compile (from meta tensors)."""
    args = _common_args(student, teacher, mask, coef)
    block_h, rows, warps = tuning_for(args["H"])
    single = args["H"] <= block_h
    args.update(loss_ptr=loss_rows, dx_ptr=student if grad is None else grad, COMPUTE_GRAD=grad is not None,
                SINGLE=single, BLOCK_H=block_h, ROWS=rows,
                ALIGN=1 if single else vector_width(student, teacher, student if grad is None else grad))
    return (triton.cdiv(args["n_rows"], rows),), args, launch_options(not single, warps)


def bwd_launch(grad, grad_rows, student, teacher, mask, coef):
    """(grid, {parameter: argument}, launch options) of the backward launch (see :func:`fwd_launch`)."""
    args = _common_args(student, teacher, mask, coef)
    block_h, rows, warps = bwd_tuning_for(args["H"])
    args.update(dx_ptr=grad, g_ptr=grad_rows, BLOCK_H=block_h, ROWS=rows, ALIGN=vector_width(student, teacher, grad))
    return (triton.cdiv(args["n_rows"], rows),), args, launch_options(block_h == CHUNK_H, warps)


def cosine_rows(student, teacher, mask, coef, loss_rows, grad):
    """Launch :func:`cosine_fwd_kernel` into the caller's ``loss_rows`` (fp32, contiguous, one value
    per row) and ``grad`` (contiguous, the student's shape and dtype; ``None``: no gradient).
    ``mask`` is a contiguous bool over the row dims or ``None``; ``coef`` a 1-element fp32 tensor."""
    if loss_rows.numel() == 0:
        return
    grid, args, options = fwd_launch(student, teacher, mask, coef, loss_rows, grad)
    cosine_fwd_kernel[grid](**args, **options)


def cosine_rows_backward(grad, grad_rows, student, teacher, mask, coef):
    """Launch :func:`cosine_bwd_kernel`: rewrites ``grad`` (made by the forward for ``coef``) in place
    into the gradient for the incoming per-row gradients ``grad_rows`` (fp32, contiguous)."""
    if grad_rows.numel() == 0:
        return
    grid, args, options = bwd_launch(grad, grad_rows, student, teacher, mask, coef)
    cosine_bwd_kernel[grid](**args, **options)
