"""``x *= factor`` in place for a 0-d fp32 device ``factor``, a no-op without any memory traffic when
``factor == 1`` exactly: the backward of ``distil::linear_kl_ce`` decides on the device whether its
gradient buffers stand as announced (1), need a rescale (r) or cannot be fixed by one (NaN), and this
applies that decision with no host sync and, in the announced case, no pass over the buffers.

PyTorch equivalent: ``x.mul_(factor)`` (which always reads and writes x). Traffic: the factor (4 bytes
per program) when it is 1, else one read and one write of x; the product is taken in fp32 and rounded
once to x's dtype.
"""
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def gated_scale_kernel(x_ptr, n, factor_ptr, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # A masked-out load touches no memory: at factor 1 every program reads the factor alone.
    live = offs < tl.where(factor != 1.0, n, 0)
    x = tl.load(x_ptr + offs, mask=live)
    tl.store(x_ptr + offs, (x.to(tl.float32) * factor).to(x.dtype), mask=live)


def gated_scale_(tensors, factor):
    """Scale each contiguous float tensor of ``tensors`` by the 0-d fp32 ``factor`` (same device) in
    place; nothing is read or written when ``factor`` is exactly 1."""
    for x in tensors:
        if x.numel():
            gated_scale_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, x.numel(), factor, BLOCK=BLOCK)
