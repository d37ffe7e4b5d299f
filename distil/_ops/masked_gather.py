"""``distil::masked_gather`` / ``distil::masked_scatter_rows``: their registration (fake impls,
autograd) and the public :func:`masked_gather` / :func:`check_capacity` (re-exported by :mod:`distil.ops`).

The DistilBERT losses use only some token rows (the ~15 % masked tokens for the MLM loss, the
non-pad tokens for KL and cosine). ``distiller.py`` selects them with
``torch.masked_select(x, mask.unsqueeze(-1).expand_as(x)).view(-1, H)``, which builds a full
``[B, S, H]`` boolean mask. ``masked_gather`` compacts the row indices once (O(B·S) memory) and
copies only the selected rows, so the LM head can then run on those rows alone.

Ops (schemas and CPU kernels in ``csrc/masked_gather.cpp``, CUDA in ``csrc/cuda/masked_gather.cu``):

- ``distil::masked_gather(x, mask, capacity) -> (rows, index, count)``
- ``distil::masked_scatter_rows(rows, index, shape) -> out``: zeros of ``shape`` with
  ``out.view(-1, H)[index[r]] = rows[r]`` wherever ``index[r] >= 0``; the backward of the gather.
  Equivalent to ``torch.zeros(shape).view(-1, H).index_copy_(0, index[index >= 0], rows[index >= 0])``.
  Non-negative indices must be distinct (the gather makes them so); if one repeats, the row with
  the largest ``r`` wins on both devices. An index ``>= prod(shape[:-1])`` is an error (on CUDA a
  device-side assert, as for ``torch.index_select``).
"""
from typing import NamedTuple

import torch

from distil._ops.common import check_row_mask, check_tensor

# Rows are copied as raw bytes, so any of these is gathered bit-exactly; only the floating
# ones carry a gradient.
GATHER_DTYPES = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)


class GatherResult(NamedTuple):
    """What :func:`masked_gather` returns.

    rows: ``[M, H]`` (exact mode) or ``[K, H]`` (capacity mode), contiguous, x's dtype.
    index: int64 flat row positions (row-major over ``mask``'s shape) of the gathered rows, in
        order; ``-1`` in padding slots.
    count: 0-d int64 tensor on x's device, the number of true entries of ``mask``. In capacity
        mode it may exceed ``K``: then only the first ``K`` rows were gathered.
    """

    rows: torch.Tensor
    index: torch.Tensor
    count: torch.Tensor


def masked_gather(x, mask, capacity=None):
    """Gather the rows of ``x`` (``[..., H]``) where ``mask`` (``x.shape[:-1]``) is true.

    PyTorch equivalent: ``rows = x[mask]``, ``index = mask.flatten().nonzero().squeeze(1)``,
    ``count = mask.sum()``; distiller.py's
    ``torch.masked_select(x, mask.unsqueeze(-1).expand_as(x)).view(-1, H)`` gives the same rows.

    Exact mode (``capacity=None``): returns exactly ``M = mask.sum()`` rows. Sizing the output
    needs the count on the host, so on CUDA this synchronises once with the device.

    Capacity mode (``capacity=K``): returns ``K`` rows with no device->host synchronisation, so
    it can run inside CUDA graphs and ``torch.compile(fullgraph=True)``. Slots past ``count``
    hold zero rows and index ``-1``. If ``count > K`` the first ``K`` selected rows are returned
    and ``count`` says how many there were: call :func:`check_capacity` to raise in that case.

    Gradient: ``d rows`` is scattered back into zeros of x's shape (``distil::masked_scatter_rows``);
    unselected or dropped rows get exactly 0. Integer and bool ``x`` get no gradient.

    Args:
        x: ``[..., H]`` tensor with at least 2 dims, dtype in ``GATHER_DTYPES``, any strides
            (read in place, no copy of x).
        mask: bool or integer tensor (nonzero = selected: Hugging Face's int64 0/1 ``attention_mask``
            as it is) of shape ``x.shape[:-1]`` on x's device; float masks are rejected.
        capacity: ``None`` or an int ``>= 0``.
    """
    check_tensor("x", x, dtypes=GATHER_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must be [..., H] with at least 2 dims, got shape {tuple(x.shape)}")
    mask = check_row_mask("mask", mask, x.shape[:-1], x.device)
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)):
            raise TypeError(f"capacity must be None or an int, got {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
    return GatherResult(*torch.ops.distil.masked_gather(x, mask, capacity))


def check_capacity(count, capacity):
    """Raise ``ValueError`` if a capacity-mode :func:`masked_gather` dropped rows (``count > capacity``).

    PyTorch equivalent: ``torch._check(int(count) <= capacity)``. Reads ``count`` on the host, so on
    CUDA it synchronises with the device: call it outside captured graphs, e.g. once per step
    after the optimizer step, or every N steps.
    """
    check_tensor("count", count, dtypes=(torch.int64,))
    if count.dim() != 0:
        raise ValueError(f"count must be a 0-d tensor, got shape {tuple(count.shape)}")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    n = int(count.item())
    if n > capacity:
        raise ValueError(f"masked_gather selected {n} rows but capacity is {capacity}: "
                         f"{n - capacity} rows were not gathered; raise the capacity")


@torch.library.register_fake("distil::masked_gather")
def _masked_gather_fake(x, mask, capacity):
    # Exact mode's row count is data-dependent: an unbacked symbolic size.
    m = torch.library.get_ctx().new_dynamic_size() if capacity is None else capacity
    return (
        x.new_empty((m, x.shape[-1])),
        x.new_empty((m,), dtype=torch.int64),
        x.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("distil::masked_scatter_rows")
def _masked_scatter_rows_fake(rows, index, shape):
    return rows.new_empty(shape)


def _gather_setup_context(ctx, inputs, output):
    x, _, _ = inputs
    ctx.x_shape = x.shape
    ctx.save_for_backward(output[1])


def _gather_backward(ctx, grad_rows, _grad_index, _grad_count):
    (index,) = ctx.saved_tensors
    return torch.ops.distil.masked_scatter_rows(grad_rows, index, ctx.x_shape), None, None


def _scatter_setup_context(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    # The scatter's adjoint is a gather by index (padding slots get 0).
    (index,) = ctx.saved_tensors
    picked = grad.reshape(-1, grad.shape[-1]).index_select(0, index.clamp_min(0))
    return torch.where((index >= 0).unsqueeze(1), picked, 0), None, None


torch.library.register_autograd("distil::masked_gather", _gather_backward, setup_context=_gather_setup_context)
torch.library.register_autograd(
    "distil::masked_scatter_rows", _scatter_backward, setup_context=_scatter_setup_context
)
