"""``distil::linear_kl_ce``: the distillation KL and the cross-entropy straight from the rows the LM heads
multiply and the heads' output projections, chunked over rows so that the ``[N, V]`` logits never exist;
plus the public :func:`linear_kl_ce_loss` and its module :class:`LinearKLCELoss`.

Per chunk of rows the op builds the student's logits (one GEMM, accumulated in fp32 by the backend and
kept in the student's dtype, as ``F.linear`` does: fp32 inputs give fp32 logits), then takes one of three
teachers for the same rows:

- a teacher head: its logits (a second GEMM into a second chunk buffer), then ``distil::kl_ce_rows_into``
  (the ``kl_ce`` kernel into caller buffers), which overwrites the student's logits with their gradient
  ``g`` for the announced ``coef``;
- precomputed ``teacher_logits``: read in place (any row strides; a ``[B, S, V]`` tensor whose rows do not
  flatten into one stride is read one sequence at a time), the same kernel;
- a top-k teacher (``teacher_topk_logits`` / ``teacher_topk_index`` [/ ``teacher_lse``], e.g. the teacher
  cache): ``distil::topk_kl_ce_rows``, whose gradient buffer is ``g`` (the logits' buffer is then freed);

then ``grad_hidden[chunk] = g @ W``, ``grad_weight += gᵀ @ h`` and ``grad_bias += g.sum(0)``, the last two in
fp32. The kernels are C++ on CPU and Triton on CUDA: the same composite serves every device.

Logit transforms, per head: ``logit_scale`` (Cohere: ``s · scale``) lands on the small operands (the
chunk's hidden rows and the bias before the GEMM, the hidden and bias gradients after it), so it costs no
pass over a ``[rows, V]`` buffer; ``logit_softcap`` c (Gemma 2/3's ``final_logit_softcapping``:
``c · tanh(s / c)``) is applied to the chunk buffer right after the GEMM (two elementwise passes, not inside
the kernels' read), and its derivative ``1 − tanh²`` multiplies ``g`` before the grad GEMMs (two more; with
a dense teacher, whose kernel has overwritten the capped logits by then, after the student's GEMM is run
once more into the teacher's freed buffer). Scale first, then the cap: ``s = c · tanh(scale · z / c)``.

Memory beyond the inputs and the parameter gradients: two ``[chunk_rows, V]`` buffers during a chunk's loss
kernel, one (``g``) during its grad GEMMs, and ``[N, H]`` for the hidden gradient
(:func:`auto_chunk_rows`). The fp32 weight gradient is created by the first chunk's weight GEMM, once that
chunk's second buffer is freed: with one chunk the peak is the unfused path's (``g`` beside the weight
gradient), with c chunks two buffers of N / c rows.

Autograd: the forward returns the two loss sums and the three gradient buffers; the backward
(``distil::linear_kl_ce_backward``) compares the two incoming scalars with the announced coefficients and
leaves the buffers as they are when they match within ``_UNIT_SCALE_TOLERANCE`` (2.4e-7 relative, two fp32
ulps: ``loss.backward()`` on ``kl_weight·kl + ce_weight·ce``), scales them when the incoming pair is a
multiple of the announced one within the same relative tolerance (16-bit logits: only by a factor in
[1/2, 2], the dense ops' rule), and otherwise runs the chunks again with the incoming coefficients (exact).
With device-tensor weights on CUDA (the trainer's loss scale) that decision is taken on the device, with
no host sync and, in the announced case, no pass over the buffers (``distil.kernels.gated_scale``); a
combination a rescale cannot reach then gives NaN gradients (a recomputation would need the decision on
the host).
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distil._ops import kl_ce  # noqa: F401  (the kl_ce_rows_into kernels and fake impl)
from distil._ops.common import (
    FLOAT_DTYPES,
    announced_coef,
    check_labels,
    check_row_mask,
    check_tensor,
    check_unit_last_stride,
    check_weight,
    divisor,
    row_count,
    save_gradient_buffer,
    take_gradient_buffer,
)
from distil._ops.divergence import JSD_BETA, SKEW_ALPHA, check_divergence
from distil._ops.topk_kl_ce import check_topk_teacher
from distil.checks import check_int, check_non_negative_finite, check_positive_finite, check_temperature

try:  # Triton is a Linux-only dependency; without it CUDA tensors have no kernel.
    from distil.kernels import gated_scale as _triton_gated_scale
except ImportError:  # pragma: no cover
    _triton_gated_scale = None

__all__ = ["linear_kl_ce_loss", "LinearKLCELoss", "auto_chunk_rows", "CHUNK_BYTES"]

# Bytes of the two per-chunk [rows, V] buffers (the student's logits, overwritten in place by their
# gradient, and the teacher's logits) that the automatic chunk size aims for. Measured on the CPU
# (benchmarks/bench_loss.py, N = 4096, H = 768, V = 30522 fp32): each chunk costs a pass over the fp32
# weight gradient [V, H] and a packing of the weights for the GEMMs, so 1024-row chunks run at the
# speed of the unfused path where 256-row ones were 15-20% slower, while the two buffers (250 MB) stay
# small next to the [N, V] logits, their gradient and the teacher's logits they replace.
CHUNK_BYTES = 256 * 2**20
# A backward factor within two fp32 ulps of 1 leaves the forward's gradients as they are (the same
# tolerance as kl_ce_rows_backward: the difference is rounding in how the caller formed w / n).
_UNIT_SCALE_TOLERANCE = 2.4e-7


def auto_chunk_rows(n_rows, vocab, bytes_per_logit):
    """Rows per chunk when ``chunk_rows`` is None: at most the largest power of two whose two
    ``[rows, vocab]`` buffers fit :data:`CHUNK_BYTES` (at least 16), and N split into that many equal
    chunks (rows rounded up to a multiple of 16), so that no chunk is a small remainder and the buffers
    are no bigger than the split needs; never more than N."""
    fit = max(16, CHUNK_BYTES // (2 * max(vocab, 1) * bytes_per_logit))
    most = 1 << (fit.bit_length() - 1)
    chunks = max(1, -(-n_rows // most))
    rows = (-(-n_rows // chunks) + 15) // 16 * 16
    return max(1, min(rows, most, n_rows))


class _Rows(NamedTuple):
    """The op's row tensors: ``[N, .]`` rows (``teacher_logits`` may be ``[B, S, V]``, see :func:`_segments`),
    the heads' projections, each head's logit transform (``softcap`` None: no cap) and the divergence (the
    ops' ``divergence, divergence_param``, from ``check_divergence``)."""

    student_head_input: torch.Tensor
    student_weight: torch.Tensor
    student_bias: Optional[torch.Tensor]
    teacher_head_input: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    teacher_bias: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]
    teacher_topk_logits: Optional[torch.Tensor]
    teacher_topk_index: Optional[torch.Tensor]
    teacher_lse: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    kl_mask: Optional[torch.Tensor]
    logit_scale: float
    logit_softcap: Optional[float]
    teacher_logit_scale: float
    teacher_logit_softcap: Optional[float]
    divergence: str
    divergence_param: float


def _head_logits(hidden, weight, bias, factor):
    """``factor · F.linear(hidden, weight, bias)``, a new ``[rows, V]`` buffer; the factor is applied to the
    hidden rows and the bias (small) rather than to the logits (a pass over the buffer)."""
    if factor != 1.0:
        hidden, bias = hidden * factor, None if bias is None else bias * factor
    return F.linear(hidden, weight, bias)


def _transformed_logits(hidden, weight, bias, scale, softcap):
    """A head's logits ``c · tanh(scale · z / c)`` (``scale · z`` without a cap), ``z = F.linear(...)``."""
    if softcap is None:
        return _head_logits(hidden, weight, bias, scale)
    return _head_logits(hidden, weight, bias, scale / softcap).tanh_().mul_(softcap)


def _segments(start, stop, seq):
    """``[start, stop)`` cut where a sequence of ``seq`` rows ends; the whole range when ``seq`` is None."""
    if seq is None:
        return [(start, stop)]
    bounds = [start, *range((start // seq + 1) * seq, stop, seq), stop]
    return list(zip(bounds[:-1], bounds[1:]))


def _teacher_rows(teacher_logits, start, stop):
    """Rows ``[start, stop)`` of ``teacher_logits`` as an ``[m, V]`` view: of ``[N, V]``, or of one sequence
    of ``[B, S, V]``."""
    if teacher_logits.dim() == 2:
        return teacher_logits[start:stop]
    seq = teacher_logits.shape[1]
    return teacher_logits[start // seq, start % seq: start % seq + (stop - start)]


def _fp32_mm(a, b):
    """``a @ b`` as a new fp32 tensor, accumulated in fp32 for half inputs too."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:  # cuBLAS: half inputs, fp32 output
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU has no half-in, fp32-out GEMM: chunk-sized temporaries


def _accumulate_mm(acc, a, b):
    """``acc += a @ b`` with ``acc`` fp32 and fp32 accumulation for half inputs too."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:  # (addmm's out_dtype with out=acc is not relied on)
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


def _dense_chunk(x, start, stop, logits, coef, temperature, ignore_index, compute_grad):
    """The loss kernel of one chunk against a dense teacher (a head, ``teacher_logits`` or none): per-row
    ``(kl, ce)``; with ``compute_grad`` the student's ``logits`` become their gradient, in place."""
    m, device = stop - start, logits.device
    kl_rows = torch.empty(m, dtype=torch.float32, device=device)
    ce_rows = torch.empty(m, dtype=torch.float32, device=device)
    labels = None if x.labels is None else x.labels[start:stop]
    kl_mask = None if x.kl_mask is None else x.kl_mask[start:stop]
    teacher, seq = None, None  # teacher_logits: read per segment
    if x.teacher_weight is not None:
        teacher = _transformed_logits(x.teacher_head_input[start:stop], x.teacher_weight, x.teacher_bias,
                                      x.teacher_logit_scale, x.teacher_logit_softcap)
    elif x.teacher_logits is None:  # no KL part: the kernel gets the student as the teacher, on no row
        teacher, kl_mask = logits, torch.zeros(m, dtype=torch.bool, device=device)
    elif x.teacher_logits.dim() == 3:
        seq = x.teacher_logits.shape[1]
    for a, b in _segments(start, stop, seq):
        i, j = a - start, b - start
        torch.ops.distil.kl_ce_rows_into(
            logits[i:j], _teacher_rows(x.teacher_logits, a, b) if teacher is None else teacher[i:j],
            None if labels is None else labels[i:j], None if kl_mask is None else kl_mask[i:j], coef, temperature,
            ignore_index, kl_rows[i:j], ce_rows[i:j], logits[i:j] if compute_grad else None, x.divergence,
            x.divergence_param,
        )
    return kl_rows, ce_rows


def _run_chunks(x, coef, temperature, ignore_index, chunk_rows, want):
    """``(kl_sum, ce_sum, grad_hidden, grad_weight, grad_bias)``: the loss sums and, where ``want`` (hidden,
    weight, bias) asks, the gradients of ``coef[0]·kl_sum + coef[1]·ce_sum`` (weight and bias in fp32;
    None where not wanted)."""
    hidden_rows, weight, bias = x.student_head_input, x.student_weight, x.student_bias
    n, vocab, device = hidden_rows.shape[0], weight.shape[0], hidden_rows.device
    want_hidden, want_weight, want_bias = want
    compute_grad = any(want)
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=device)
    want_bias = want_bias and bias is not None
    grad_hidden = torch.empty_like(hidden_rows) if want_hidden else None  # every row is written
    # made by the first chunk's GEMM / sum, once only that chunk's gradient is alive (no zeroed accumulators)
    grad_weight = grad_bias = None
    scale, softcap = x.logit_scale, x.logit_softcap
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        hidden = hidden_rows[start:stop]
        logits = _transformed_logits(hidden, weight, bias, scale, softcap)
        if x.teacher_topk_logits is None:
            kl_rows, ce_rows = _dense_chunk(x, start, stop, logits, coef, temperature, ignore_index, compute_grad)
            grad = logits
            if compute_grad and softcap is not None:  # the capped logits are gone: their GEMM once more
                tanh = _head_logits(hidden, weight, bias, scale / softcap).tanh_()
                grad.addcmul_(grad, tanh.square_(), value=-1.0)  # g · (1 − tanh²)
                del tanh
        else:
            kl_rows, ce_rows, grad = torch.ops.distil.topk_kl_ce_rows(
                logits, x.teacher_topk_logits[start:stop], x.teacher_topk_index[start:stop],
                None if x.teacher_lse is None else x.teacher_lse[start:stop],
                None if x.labels is None else x.labels[start:stop],
                None if x.kl_mask is None else x.kl_mask[start:stop], coef, temperature, ignore_index, compute_grad,
                x.divergence, x.divergence_param)
            if compute_grad and softcap is not None:
                grad.addcmul_(grad, logits.div_(softcap).square_(), value=-1.0)  # g · (1 − tanh²)
        del logits  # the dense path's g lives on as grad; the top-k path's logits buffer is freed here
        kl_sum += kl_rows.sum()
        ce_sum += ce_rows.sum()
        if not compute_grad:
            continue
        # d/dz of c·tanh(scale·z/c) is scale·(1 − tanh²): the scale goes onto the small operands.
        if grad_hidden is not None:
            torch.mm(grad, weight, out=grad_hidden[start:stop])
            if scale != 1.0:
                grad_hidden[start:stop].mul_(scale)
        if want_weight:
            scaled_hidden = hidden if scale == 1.0 else hidden * scale
            if grad_weight is None:
                grad_weight = _fp32_mm(grad.t(), scaled_hidden)
            else:
                _accumulate_mm(grad_weight, grad.t(), scaled_hidden)
        if want_bias:
            bias_sum = grad.sum(0, dtype=torch.float32)
            if scale != 1.0:
                bias_sum.mul_(scale)
            grad_bias = bias_sum if grad_bias is None else grad_bias.add_(bias_sum)
        del grad
    if n == 0:
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if want_bias else None
    return kl_sum, ce_sum, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("distil::linear_kl_ce", mutates_args=())
def _linear_kl_ce(student_head_input: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
                  teacher_head_input: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                  teacher_bias: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  teacher_topk_logits: Optional[torch.Tensor], teacher_topk_index: Optional[torch.Tensor],
                  teacher_lse: Optional[torch.Tensor], labels: Optional[torch.Tensor], kl_mask: Optional[torch.Tensor],
                  logit_scale: float, logit_softcap: Optional[float], teacher_logit_scale: float,
                  teacher_logit_softcap: Optional[float], divergence: str, divergence_param: float,
                  coef: torch.Tensor, temperature: float, ignore_index: int, chunk_rows: int, grad_inputs: List[bool],
                  sync_free: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl_sum, ce_sum, grad_hidden, grad_weight, grad_bias) for 2-D hidden rows; a gradient not asked for
    by ``grad_inputs`` (hidden, weight, bias) is an empty tensor. ``sync_free`` is for the backward."""
    x = _Rows(student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias,
              teacher_logits, teacher_topk_logits, teacher_topk_index, teacher_lse, labels, kl_mask, logit_scale,
              logit_softcap, teacher_logit_scale, teacher_logit_softcap, divergence, divergence_param)
    with torch.autocast(student_head_input.device.type, enabled=False):
        kl_sum, ce_sum, grad_hidden, grad_weight, grad_bias = _run_chunks(x, coef, temperature, ignore_index,
                                                                          chunk_rows, grad_inputs)
    def none():  # an output each: outputs may not alias
        return student_head_input.new_empty(0)

    return (kl_sum, ce_sum, none() if grad_hidden is None else grad_hidden,
            none() if grad_weight is None else grad_weight.to(student_weight.dtype),
            none() if grad_bias is None else grad_bias.to(student_bias.dtype))


_N_ROW_ARGS = len(_Rows._fields)  # the op's arguments before coef: the row tensors, transforms, divergence
_N_TENSORS = _Rows._fields.index("logit_scale")


@_linear_kl_ce.register_fake
def _linear_kl_ce_fake(*args):
    x = _Rows(*args[:_N_ROW_ARGS])
    want_hidden, want_weight, want_bias = args[-2]
    hidden = x.student_head_input
    return (
        hidden.new_empty((), dtype=torch.float32), hidden.new_empty((), dtype=torch.float32),
        torch.empty_like(hidden) if want_hidden else hidden.new_empty(0),
        torch.empty_like(x.student_weight) if want_weight else hidden.new_empty(0),
        torch.empty_like(x.student_bias) if want_bias and x.student_bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("distil::linear_kl_ce_backward",
                         mutates_args=("grad_hidden", "grad_weight", "grad_bias"))
def _linear_kl_ce_backward(grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor,
                           grad_sums: torch.Tensor, student_head_input: torch.Tensor, student_weight: torch.Tensor,
                           student_bias: Optional[torch.Tensor], teacher_head_input: Optional[torch.Tensor],
                           teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                           teacher_logits: Optional[torch.Tensor], teacher_topk_logits: Optional[torch.Tensor],
                           teacher_topk_index: Optional[torch.Tensor], teacher_lse: Optional[torch.Tensor],
                           labels: Optional[torch.Tensor], kl_mask: Optional[torch.Tensor], logit_scale: float,
                           logit_softcap: Optional[float], teacher_logit_scale: float,
                           teacher_logit_softcap: Optional[float], divergence: str, divergence_param: float,
                           coef: torch.Tensor, temperature: float, ignore_index: int, chunk_rows: int,
                           sync_free: bool) -> None:
    """Turns the forward's gradients (of ``coef · sums``) into those of ``grad_sums · sums`` in place:
    nothing when they are equal, a scale when proportional and the scale keeps the logits' precision,
    else the chunks run again (exact). ``sync_free`` on CUDA: decided on the device (see the module
    docstring), no recomputation."""
    buffers = [b for b in (grad_hidden, grad_weight, grad_bias) if b.numel() > 0]
    narrow = student_head_input.dtype != torch.float32  # the logits' gradient was written in 16 bits
    if sync_free and grad_sums.is_cuda:
        _triton_gated_scale.gated_scale_(buffers, _device_factor(grad_sums, coef, narrow))
        return
    announced, incoming = coef.tolist(), grad_sums.tolist()  # four floats: one tiny device-to-host copy
    scale = _proportion(incoming, announced)
    if scale is not None and _keeps_precision(scale, narrow):
        if abs(scale - 1.0) > _UNIT_SCALE_TOLERANCE:
            for b in buffers:
                b.mul_(scale)
        return
    x = _Rows(student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias,
              teacher_logits, teacher_topk_logits, teacher_topk_index, teacher_lse, labels, kl_mask, logit_scale,
              logit_softcap, teacher_logit_scale, teacher_logit_softcap, divergence, divergence_param)
    want = (grad_hidden.numel() > 0, grad_weight.numel() > 0, grad_bias.numel() > 0)
    with torch.autocast(student_head_input.device.type, enabled=False):
        *_, new_hidden, new_weight, new_bias = _run_chunks(x, grad_sums.float().contiguous(), temperature,
                                                           ignore_index, chunk_rows, want)
    for out, new in zip((grad_hidden, grad_weight, grad_bias), (new_hidden, new_weight, new_bias)):
        if new is not None:
            out.copy_(new)


@_linear_kl_ce_backward.register_fake
def _linear_kl_ce_backward_fake(grad_hidden, grad_weight, grad_bias, grad_sums, *args):
    return None


def _proportion(incoming, announced):
    """r with incoming == r · announced (within rounding), or None when there is none."""
    pivot = max(range(2), key=lambda i: abs(announced[i]))
    if announced[pivot] == 0.0:
        return 0.0 if incoming == [0.0, 0.0] else None
    scale = incoming[pivot] / announced[pivot]
    for want, have in zip(incoming, announced):
        if abs(want - scale * have) > _UNIT_SCALE_TOLERANCE * max(abs(want), abs(scale * have)):
            return None
    return scale


def _keeps_precision(scale, narrow):
    """The host twin of ``rescale_keeps_precision`` (kernels/rows.py, csrc/rows.h): any factor for fp32
    logits, only [1/2, 2] for 16-bit ones (a farther one would carry fp16's underflow into the gradient)."""
    return not narrow or 0.5 <= abs(scale) <= 2.0


def _device_factor(incoming, announced, narrow):
    """:func:`_proportion` and :func:`_keeps_precision` on the device (no host sync): a 0-d fp32 tensor,
    exactly 1 when the buffers stand as they are (equal within the unit tolerance, or both all zero),
    the factor when a rescale is exact enough, NaN when only a recomputation would be."""
    magnitude = announced.abs()
    pivot = magnitude.argmax().reshape(1)  # no Python indexing with a tensor: that would sync
    scale = (incoming.gather(0, pivot) / announced.gather(0, pivot)).reshape(())
    scaled = scale * announced
    proportional = ((incoming - scaled).abs()
                    <= _UNIT_SCALE_TOLERANCE * torch.maximum(incoming.abs(), scaled.abs())).all()
    ok = proportional & (magnitude.amax() != 0)
    if narrow:
        ok &= (scale.abs() >= 0.5) & (scale.abs() <= 2.0)
    unit = (ok & ((scale - 1.0).abs() <= _UNIT_SCALE_TOLERANCE)) | ((magnitude.amax() == 0) & (incoming == 0).all())
    factor = torch.where(ok, scale, torch.full_like(scale, float("nan")))
    return torch.where(unit, torch.ones_like(scale), factor)


def _setup_context(ctx, inputs, output):
    rows, (coef, temperature, ignore_index, chunk_rows, grad_inputs, sync_free) = (inputs[:_N_ROW_ARGS],
                                                                                     inputs[_N_ROW_ARGS:])
    ctx.transforms = rows[_N_TENSORS:]
    ctx.settings = (temperature, ignore_index, chunk_rows, sync_free)
    save_gradient_buffer(ctx, output[2:], any(grad_inputs), *rows[:_N_TENSORS], coef)


def _backward(ctx, grad_kl_sum, grad_ce_sum, *_grads_of_buffers):
    grad_hidden, grad_weight, grad_bias, *tensors, coef = take_gradient_buffer(ctx, "linear_kl_ce")
    zero = torch.zeros((), dtype=torch.float32, device=coef.device)
    grad_sums = torch.stack([zero if g is None else g.float() for g in (grad_kl_sum, grad_ce_sum)])
    torch.ops.distil.linear_kl_ce_backward(grad_hidden, grad_weight, grad_bias, grad_sums, *tensors, *ctx.transforms,
                                           coef, *ctx.settings)
    wanted = ctx.needs_input_grad
    return (grad_hidden if wanted[0] else None, grad_weight if wanted[1] else None,
            grad_bias if wanted[2] else None) + (None,) * (len(wanted) - 3)


_linear_kl_ce.register_autograd(_backward, setup_context=_setup_context)


def _check_head(prefix, hidden, weight, bias, rows_shape, device, vocab=None):
    """hidden ``[*rows, H]`` float, weight ``[V, H]`` (V = ``vocab`` when given) and bias ``[V]`` (or None)
    of the same dtype."""
    check_tensor(f"{prefix}_head_input", hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor(f"{prefix}_weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{prefix}_weight has V = {weight.shape[0]} but student_weight has {vocab}")
    if tuple(hidden.shape[:-1]) != tuple(rows_shape):
        raise ValueError(f"{prefix}_head_input must have the row dims {tuple(rows_shape)}, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must be [V, {hidden.shape[-1]}] ({prefix}_head_input's H), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight has dtype {weight.dtype} but {prefix}_head_input has {hidden.dtype}")
    for name, t in ((f"{prefix}_head_input", hidden), (f"{prefix}_weight", weight)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but student_head_input is on {device}")
    if bias is not None:
        check_tensor(f"{prefix}_bias", bias, dtypes=(weight.dtype,), ndims=(1,))
        if bias.shape[0] != weight.shape[0] or bias.device != device:
            raise ValueError(f"{prefix}_bias must be [{weight.shape[0]}] on {device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")


def _autocast(device, *tensors):
    """Under autocast the heads run in its dtype, as F.linear would."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def check_logit_transform(prefix, scale, softcap):
    """A head's ``(logit_scale, logit_softcap)`` as floats: the scale finite and > 0, the cap None or
    finite and > 0. ``prefix``: "" or "teacher_"."""
    scale = check_positive_finite(f"{prefix}logit_scale", scale)
    return scale, None if softcap is None else check_positive_finite(f"{prefix}logit_softcap", softcap)


def _rows_view(t):
    """``t`` ``[B, S, V]`` as an ``[N, V]`` view when its strides allow one (else ``t``, read one sequence at
    a time); ``[N, V]`` as it is. Nothing is copied."""
    if t.dim() == 3 and (t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)):
        return t.view(-1, t.shape[-1])
    return t


def linear_kl_ce_loss(student_head_input, student_weight, student_bias, labels, *, teacher_head_input=None,
                      teacher_weight=None, teacher_bias=None, teacher_logits=None, teacher_topk_logits=None,
                      teacher_topk_index=None, teacher_lse=None, teacher_lse_temperature=None, temperature=2.0,
                      kl_mask=None, ignore_index=-100, kl_weight=1.0, ce_weight=1.0, chunk_rows=None,
                      logit_scale=1.0, logit_softcap=None, teacher_logit_scale=1.0, teacher_logit_softcap=None,
                      divergence="forward_kl", jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
    """:func:`distil.fused_loss.kl_ce_loss` (or :func:`~distil.fused_loss.topk_kl_ce_loss`) of the LM heads'
    logits, without materialising them.

    Returns ``(kl, ce)`` = ``kl_ce_loss(s, t, labels, ...)`` with the student's logits
    ``s = F.linear(student_head_input, student_weight, student_bias)`` and the teacher's
    ``t = F.linear(teacher_head_input, teacher_weight, teacher_bias)`` (or the precomputed ``teacher_logits``):
    the ``nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T), F.softmax(t / T)) * T**2`` over the
    ``kl_mask`` rows (distiller.py's ``loss_ce``) and ``nn.CrossEntropyLoss(ignore_index=ignore_index)(s,
    labels)`` (its ``loss_mlm``). With a top-k teacher (``teacher_topk_logits`` and ``teacher_topk_index``,
    optionally ``teacher_lse``: e.g. :class:`distil.teacher_cache.TeacherCache`'s) it is
    ``topk_kl_ce_loss(s, teacher_topk_logits, teacher_topk_index, labels, teacher_lse=..., ...)``: the
    student's head fused with a cached teacher. The rows are processed ``chunk_rows`` at a time, so beyond
    the inputs and the parameter gradients the memory is O(chunk_rows · V), not O(N · V); the gradients
    w.r.t. the student's rows, weight and bias are computed during the forward for
    ``kl_weight * kl + ce_weight * ce`` (any other combination is still exact: its backward scales them, or
    recomputes them for a non-proportional one or, with 16-bit rows, for a factor outside [1/2, 2]). They
    reach ``.grad`` through autograd, so tied embeddings, DDP hooks and gradient accumulation work. The
    teacher gets no gradient.

    Logit transforms, per head, as the models apply them after the projection: ``logit_scale`` multiplies
    the logits (Cohere's ``logit_scale``), then ``logit_softcap`` c soft-caps them, ``c · tanh(s / c)``
    (Gemma 2/3's ``final_logit_softcapping``): the student's logits are
    ``c · tanh(logit_scale · F.linear(...) / c)``, the loss and its gradient are those of these logits, and
    the teacher head's likewise with ``teacher_logit_scale`` / ``teacher_logit_softcap``. The scale costs no
    pass over the logits; the cap costs elementwise passes over each chunk buffer (outside the kernels'
    read) and, with a dense teacher, the student's GEMM a second time (see the module docstring).
    Precomputed teachers (``teacher_logits``, top-k) are final logits: the teacher transforms are refused.

    With a loss scale (GradScaler) or 1/grad_accum, announce the product, as for ``kl_ce_loss``: 16-bit
    gradients are then written at their final scale (not rescaled from underflowing values) and the
    backward is free. Weights given as 0-d device tensors make the backward decide on the device (no
    host sync, the trainer's default step): there it must then be a multiple of the announced
    combination within the rescale rule above, or the gradients come out NaN on CUDA (CPU recomputes).

    Args:
        student_head_input: ``[N, Hs]`` or ``[B, S, Hs]`` rows the student's projection multiplies (after the
            head's transform), fp32/bf16/fp16.
        student_weight, student_bias: the student's output projection ``[V, Hs]`` and ``[V]`` (bias may be
            None), in ``student_head_input``'s dtype (under autocast all run in the autocast dtype).
        labels: int64/int32 over the row dims, ``[0, V)`` or ``ignore_index``; None computes no CE (ce = 0).
        teacher_head_input, teacher_weight, teacher_bias: the teacher's rows ``[.., Ht]`` (Ht may differ from
            Hs) and projection ``[V, Ht]``, ``[V]``. Or instead ``teacher_logits`` ``[.., V]`` (unit stride
            along V, any row strides: read in place), or the top-k teacher below. Without a teacher no KL is
            computed (kl = 0).
        teacher_topk_logits, teacher_topk_index, teacher_lse, teacher_lse_temperature: the teacher's top-k
            logits ``[.., k]``, their vocabulary indices and the optional full-vocabulary
            ``logsumexp(t / T)`` with the T it was taken at, as :func:`~distil.fused_loss.topk_kl_ce_loss`
            takes them (exact mode with ``teacher_lse``, renormalised without).
        temperature, kl_mask, ignore_index: as in ``kl_ce_loss``.
        kl_weight, ce_weight: numbers >= 0 or one-element float tensors on the rows' device, as in
            ``kl_ce_loss``.
        chunk_rows: rows per chunk; None picks :func:`auto_chunk_rows` (a byte budget of the two
            ``[rows, V]`` buffers).
        logit_scale, logit_softcap: the student head's transform: a float > 0 (1: none) and None (no cap)
            or a float > 0.
        teacher_logit_scale, teacher_logit_softcap: the teacher head's, likewise.
        divergence, jsd_beta, skew_alpha: the divergence in place of the forward KL, as in ``kl_ce_loss``
            (e.g. TRL's GKD loss: ``divergence="jsd", jsd_beta=β``), with any teacher; a top-k teacher takes it on
            the buckets of ``topk_kl_ce_loss``.
    Returns:
        ``(kl, ce)`` fp32 scalars; each is exactly 0 when it has no rows.
    """
    settings = _check_settings(temperature, ignore_index, chunk_rows, logit_scale, logit_softcap, teacher_logit_scale,
                               teacher_logit_softcap, divergence, jsd_beta, skew_alpha)
    return linear_kl_ce_core(settings, _check_number_weight("kl_weight", kl_weight),
                             _check_number_weight("ce_weight", ce_weight), student_head_input, student_weight,
                             student_bias, labels, teacher_head_input, teacher_weight, teacher_bias, teacher_logits,
                             teacher_topk_logits, teacher_topk_index, teacher_lse, teacher_lse_temperature, kl_mask)


class _Settings(NamedTuple):
    """The scalar arguments of :func:`linear_kl_ce_loss`, checked (:func:`_check_settings`); the divergence
    as the ops take it."""

    temperature: float
    ignore_index: int
    chunk_rows: Optional[int]
    logit_scale: float
    logit_softcap: Optional[float]
    teacher_logit_scale: float
    teacher_logit_softcap: Optional[float]
    divergence: str
    divergence_param: float


def _check_settings(temperature, ignore_index, chunk_rows, logit_scale, logit_softcap, teacher_logit_scale,
                    teacher_logit_softcap, divergence, jsd_beta, skew_alpha):
    return _Settings(check_temperature("temperature", temperature), check_int("ignore_index", ignore_index),
                     None if chunk_rows is None else check_int("chunk_rows", chunk_rows, 1),
                     *check_logit_transform("", logit_scale, logit_softcap),
                     *check_logit_transform("teacher_", teacher_logit_scale, teacher_logit_softcap),
                     *check_divergence(divergence, jsd_beta, skew_alpha))


def _check_number_weight(name, value):
    """A loss weight given as a number, checked; a tensor one is checked by :func:`linear_kl_ce_core`, which
    knows the rows' device."""
    return value if isinstance(value, torch.Tensor) else check_non_negative_finite(name, value)


def linear_kl_ce_core(settings, kl_weight, ce_weight, student_head_input, student_weight, student_bias, labels,
                      teacher_head_input, teacher_weight, teacher_bias, teacher_logits, teacher_topk_logits,
                      teacher_topk_index, teacher_lse, teacher_lse_temperature, kl_mask):
    """:func:`linear_kl_ce_loss` with its scalar arguments checked (``settings``; weights: numbers checked,
    tensors not yet): checks the call's tensors once, then runs the op."""
    (temperature, ignore_index, chunk_rows, logit_scale, logit_softcap, teacher_logit_scale, teacher_logit_softcap,
     divergence, divergence_param) = settings
    check_tensor("student_head_input", student_head_input, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    rows_shape, device = student_head_input.shape[:-1], student_head_input.device
    n_rows = rows_shape.numel()
    student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias = _autocast(
        device, student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias)
    _check_head("student", student_head_input, student_weight, student_bias, rows_shape, device)
    vocab = student_weight.shape[0]
    has_head = teacher_head_input is not None or teacher_weight is not None
    has_topk = teacher_topk_logits is not None or teacher_topk_index is not None
    if has_head + (teacher_logits is not None) + has_topk > 1:
        raise ValueError("pass one teacher: teacher_head_input + teacher_weight, teacher_logits, or "
                         "teacher_topk_logits + teacher_topk_index")
    if (teacher_head_input is None) != (teacher_weight is None) or (
            teacher_bias is not None and teacher_weight is None):
        raise ValueError("teacher_head_input and teacher_weight (and teacher_bias) go together")
    if (teacher_topk_logits is None) != (teacher_topk_index is None) or (
            (teacher_lse is not None or teacher_lse_temperature is not None) and not has_topk):
        raise ValueError("teacher_topk_logits and teacher_topk_index (and teacher_lse, teacher_lse_temperature) "
                         "go together")
    if not has_head and (teacher_logit_scale != 1.0 or teacher_logit_softcap is not None):
        raise ValueError("teacher_logit_scale / teacher_logit_softcap transform the teacher head's logits; "
                         "teacher_logits and top-k logits are final logits (apply the transform before)")
    kl_mask = check_row_mask("kl_mask", kl_mask, rows_shape, device)
    if has_head:
        _check_head("teacher", teacher_head_input, teacher_weight, teacher_bias, rows_shape, device, vocab)
        teacher_head_input = teacher_head_input.detach().reshape(-1, teacher_head_input.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits, dtypes=FLOAT_DTYPES)
        if tuple(teacher_logits.shape) != (*rows_shape, vocab) or teacher_logits.device != device:
            raise ValueError(f"teacher_logits must be {(*rows_shape, vocab)} on {device}, "
                             f"got {tuple(teacher_logits.shape)} on {teacher_logits.device}")
        check_unit_last_stride("teacher_logits", teacher_logits)
        teacher_logits = _rows_view(teacher_logits.detach())
    poison = None
    if has_topk:
        teacher_topk_logits, teacher_topk_index, teacher_lse, poison = check_topk_teacher(
            rows_shape, device, teacher_topk_logits, teacher_topk_index, teacher_lse, teacher_lse_temperature,
            temperature, kl_mask)
        # [N, k] rows: a copy only where [B, S, k] strides do not flatten (k values per row, not V).
        k = teacher_topk_logits.shape[-1]
        teacher_topk_logits = teacher_topk_logits.reshape(n_rows, k)
        teacher_topk_index = teacher_topk_index.reshape(n_rows, k)
        teacher_lse = None if teacher_lse is None else teacher_lse.reshape(n_rows)
    kl_weight, ce_weight = (w if not isinstance(w, torch.Tensor) else check_weight(name, w, device)
                            for name, w in (("kl_weight", kl_weight), ("ce_weight", ce_weight)))
    sync_free = isinstance(kl_weight, torch.Tensor) or isinstance(ce_weight, torch.Tensor)
    has_teacher = has_head or teacher_logits is not None or has_topk
    kl_count = row_count(kl_mask, rows_shape) if has_teacher else 0
    ce_count = 0
    if labels is not None:
        labels, labelled = check_labels(labels, rows_shape, vocab, device, ignore_index)
        labels = labels.reshape(-1)
        ce_count = labelled.sum()
    coef = torch.stack([announced_coef(kl_weight if has_teacher else 0.0, kl_count, device),
                        announced_coef(ce_weight if labels is not None else 0.0, ce_count, device)])
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(n_rows, vocab, student_head_input.element_size())
    grad_on = torch.is_grad_enabled()
    grad_inputs = [grad_on and t is not None and t.requires_grad
                   for t in (student_head_input, student_weight, student_bias)]
    kl_sum, ce_sum, *_ = torch.ops.distil.linear_kl_ce(
        student_head_input.reshape(-1, student_head_input.shape[-1]), student_weight, student_bias, teacher_head_input,
        teacher_weight, teacher_bias, teacher_logits, teacher_topk_logits, teacher_topk_index, teacher_lse, labels,
        None if kl_mask is None else kl_mask.reshape(-1), logit_scale, logit_softcap, teacher_logit_scale,
        teacher_logit_softcap, divergence, divergence_param, coef, temperature, ignore_index, chunk_rows, grad_inputs,
        sync_free,
    )
    kl = kl_sum / divisor(kl_count)
    if poison is not None:  # an impossible lse on the device path: a NaN KL, as topk_kl_ce_loss gives
        kl = kl + poison.sum()
    return kl, ce_sum / divisor(ce_count)


def _head_params(name, head):
    """(weight, bias) of an nn.Linear-like head; a clear error for an FSDP-sharded head used outside its forward."""
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{name} must be an nn.Linear-like module with a .weight [V, H], got {type(head).__name__}")
    weight, bias = head.weight, getattr(head, "bias", None)
    if type(weight).__name__ == "DTensor" or type(weight.data).__name__ == "DTensor":
        raise RuntimeError(
            f"{name}.weight is a sharded DTensor: shard this LinearKLCELoss with fully_shard (it holds the "
            "heads) so that its forward gathers them, rather than reading the sharded head directly")
    return weight, bias


class LinearKLCELoss(nn.Module):
    """:func:`linear_kl_ce_loss` from the models' output projections, for trainers.

    ``LinearKLCELoss(student_head, teacher_head)`` with the heads as ``nn.Linear`` (e.g.
    ``model.get_output_embeddings()``; the teacher's may be None when the teacher comes as logits or top-k
    logits), called with the rows *after each head's transform*, i.e. what the projection multiplies:

    - BERT (``BertForMaskedLM``): ``cls.predictions.transform(sequence_output)`` (dense → GELU → LayerNorm),
      projection ``cls.predictions.decoder`` (tied to the word embeddings);
    - DistilBERT: ``vocab_layer_norm(gelu(vocab_transform(hidden)))``, projection ``vocab_projector``;
    - RoBERTa: ``lm_head.layer_norm(gelu(lm_head.dense(hidden)))``, projection ``lm_head.decoder``;
    - LLaMA-style decoders: the final norm's output (``model.norm``, i.e. ``outputs.hidden_states[-1]``),
      projection ``lm_head`` (no bias); Gemma 2/3 add ``logit_softcap=config.final_logit_softcapping``,
      Cohere ``logit_scale=config.logit_scale`` (and the teacher's likewise).

    The heads are submodules, so the module can be sharded with FSDP2: ``fully_shard(loss_module)`` gathers
    the heads' weights in its forward and reduce-scatters their gradients in the backward.
    """

    def __init__(self, student_head, teacher_head=None, *, temperature=2.0, ignore_index=-100, kl_weight=1.0,
                 ce_weight=1.0, chunk_rows=None, logit_scale=1.0, logit_softcap=None, teacher_logit_scale=1.0,
                 teacher_logit_softcap=None, divergence="forward_kl", jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
        super().__init__()
        # Checked once here; forward hands them to the core as they are.
        settings = _check_settings(temperature, ignore_index, chunk_rows, logit_scale, logit_softcap,
                                   teacher_logit_scale, teacher_logit_softcap, divergence, jsd_beta, skew_alpha)
        (self.temperature, self.ignore_index, self.chunk_rows, self.logit_scale, self.logit_softcap,
         self.teacher_logit_scale, self.teacher_logit_softcap) = settings[:7]
        self.op_divergence = settings[7:]  # (divergence, divergence_param) as the ops take them
        self.divergence, self.jsd_beta, self.skew_alpha = divergence, jsd_beta, skew_alpha
        _head_params("student_head", student_head)
        if teacher_head is not None:
            _head_params("teacher_head", teacher_head)
        self.student_head = student_head
        self.teacher_head = teacher_head
        self.kl_weight = check_non_negative_finite("kl_weight", kl_weight)
        self.ce_weight = check_non_negative_finite("ce_weight", ce_weight)
        if teacher_head is None and (self.teacher_logit_scale != 1.0 or self.teacher_logit_softcap is not None):
            raise ValueError("teacher_logit_scale / teacher_logit_softcap need a teacher_head")

    def extra_repr(self):
        transforms = "".join(f", {name}={getattr(self, name)}" for name, off in (
            ("logit_scale", 1.0), ("logit_softcap", None), ("teacher_logit_scale", 1.0),
            ("teacher_logit_softcap", None)) if getattr(self, name) != off)
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, kl_weight={self.kl_weight}, "
                f"ce_weight={self.ce_weight}, chunk_rows={self.chunk_rows}{transforms}{self._divergence_repr()}")

    def _divergence_repr(self):
        if self.divergence == "jsd":
            return f", divergence='jsd', jsd_beta={self.jsd_beta}"
        if self.divergence.startswith("skew"):
            return f", divergence={self.divergence!r}, skew_alpha={self.skew_alpha}"
        return "" if self.divergence == "forward_kl" else f", divergence={self.divergence!r}"

    def forward(self, student_head_input, labels, teacher_head_input=None, *, teacher_logits=None,
                teacher_topk_logits=None, teacher_topk_index=None, teacher_lse=None, teacher_lse_temperature=None,
                kl_mask=None, kl_weight=None, ce_weight=None):
        """``(kl, ce)`` of ``linear_kl_ce_loss`` with this module's heads and settings; the teacher is
        ``teacher_head_input`` (through ``teacher_head``), ``teacher_logits`` or the top-k teacher, as there.
        ``kl_weight`` / ``ce_weight`` (numbers or 0-d device tensors, e.g. with a loss scale) replace the
        module's for this call."""
        weight, bias = _head_params("student_head", self.student_head)
        teacher_transform = (1.0, None)  # teacher_logits and top-k logits are final
        t_weight = t_bias = None
        if teacher_head_input is not None:
            if self.teacher_head is None:
                raise ValueError("teacher_head_input needs a teacher_head (or pass teacher_logits)")
            t_weight, t_bias = _head_params("teacher_head", self.teacher_head)
            teacher_transform = (self.teacher_logit_scale, self.teacher_logit_softcap)
        settings = _Settings(self.temperature, self.ignore_index, self.chunk_rows, self.logit_scale,
                             self.logit_softcap, *teacher_transform, *self.op_divergence)
        kl_weight = self.kl_weight if kl_weight is None else _check_number_weight("kl_weight", kl_weight)
        ce_weight = self.ce_weight if ce_weight is None else _check_number_weight("ce_weight", ce_weight)
        return linear_kl_ce_core(settings, kl_weight, ce_weight, student_head_input, weight, bias, labels,
                                 teacher_head_input, t_weight, t_bias, teacher_logits, teacher_topk_logits,
                                 teacher_topk_index, teacher_lse, teacher_lse_temperature, kl_mask)
