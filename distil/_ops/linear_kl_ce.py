"""``distil::linear_kl_ce``: the distillation KL and the masked-LM cross-entropy straight from the hidden
rows and the two LM heads (the vocabulary projections), chunked over rows so that the ``[N, V]`` logits
never exist; plus the public :func:`linear_kl_ce_loss` and its module :class:`LinearKLCELoss`.

Per chunk of rows the op builds the student's logits (one GEMM, accumulated in fp32 by the backend and
kept in the student's dtype, as ``F.linear`` does: fp32 inputs give fp32 logits), the teacher's logits for
the same rows (or reads the precomputed ones), and runs ``distil::kl_ce_rows_into``, which overwrites the
student's logits with the chunk's logit gradient ``g`` for the announced ``coef``; then ``grad_hidden[chunk] = g @ W``,
``grad_weight += gᵀ @ h`` and ``grad_bias += g.sum(0)``, the last two accumulated in fp32. The same
composite serves every device: ``kl_ce_rows_into`` is the C++ kernel on CPU and the Triton kernel on CUDA.

Autograd: the forward returns the two loss sums and the three gradient buffers; the backward
(``distil::linear_kl_ce_backward``) compares the two incoming scalars with the announced coefficients and
leaves the buffers as they are when equal (``loss.backward()`` on ``kl_weight·kl + ce_weight·ce``),
scales them when proportional (16-bit logits: only by a factor in [1/2, 2], the dense ops' rule), and
otherwise runs the chunks again with the incoming coefficients (exact). With device-tensor weights on
CUDA (the trainer's loss scale) that decision is taken on the device, with no host sync and, in the
announced case, no pass over the buffers (``distil.kernels.gated_scale``); a combination a rescale
cannot reach then gives NaN gradients (a recomputation would need the decision on the host).
"""
from typing import List, Optional

import torch
from torch import nn

from distil._ops import kl_ce  # noqa: F401  (the kl_ce_rows kernels, fake impl and autograd)
from distil._ops.common import (
    FLOAT_DTYPES,
    announced_coef,
    check_labels,
    check_row_mask,
    check_tensor,
    check_weight,
    divisor,
    row_count,
    take_gradient_buffer,
)
from distil.checks import check_int, check_non_negative_finite, check_temperature

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


def _linear_into(out, hidden, weight, bias):
    """``out = F.linear(hidden, weight, bias)`` into a preallocated chunk buffer."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _accumulate_mm(acc, a, b):
    """``acc += a @ b`` with ``acc`` fp32 and fp32 accumulation for half inputs too."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:  # cuBLAS: half inputs, fp32 output (addmm's out_dtype with out=acc is not relied on)
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # CPU has no half-in, fp32-out GEMM: upcast the chunk's operands (chunk-sized temporaries).
        acc.addmm_(a.float(), b.float())


def _run_chunks(student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias,
                teacher_logits, labels, kl_mask, coef, temperature, ignore_index, chunk_rows, grads):
    """The loss sums ``(kl_sum, ce_sum)``; with ``grads = (grad_hidden, grad_weight_fp32, grad_bias_fp32)``
    (each None when not wanted) also the gradients of ``coef[0]·kl_sum + coef[1]·ce_sum``, written into
    them (the weight and bias ones accumulated, so they must start at zero)."""
    n, vocab = student_head_input.shape[0], student_weight.shape[0]
    device = student_head_input.device
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=device)
    if n == 0:
        return kl_sum, ce_sum
    rows = min(chunk_rows, n)
    # The student's logits, then (written in place by the kernel) their gradient.
    logits_buf = student_head_input.new_empty(rows, vocab)
    kl_buf = torch.empty(rows, dtype=torch.float32, device=device)
    ce_buf = torch.empty(rows, dtype=torch.float32, device=device)
    has_teacher = teacher_logits is not None or teacher_weight is not None
    if teacher_weight is not None:
        teacher_buf = teacher_head_input.new_empty(rows, vocab)
    if not has_teacher:  # no KL part: the kernel gets the student's logits as the teacher, on no row
        no_kl_rows = torch.zeros(rows, dtype=torch.bool, device=device)
    grad_hidden, grad_weight, grad_bias = grads if grads is not None else (None, None, None)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        m = stop - start
        hidden = student_head_input[start:stop]
        student = _linear_into(logits_buf[:m], hidden, student_weight, student_bias)
        if teacher_logits is not None:
            teacher = teacher_logits[start:stop]
        elif teacher_weight is not None:
            teacher = _linear_into(teacher_buf[:m], teacher_head_input[start:stop], teacher_weight, teacher_bias)
        else:
            teacher = student
        if not has_teacher:
            mask = no_kl_rows[:m]
        else:
            mask = None if kl_mask is None else kl_mask[start:stop]
        torch.ops.distil.kl_ce_rows_into(
            student, teacher, None if labels is None else labels[start:stop], mask, coef, temperature,
            ignore_index, kl_buf[:m], ce_buf[:m], student if grads is not None else None,
        )
        kl_sum += kl_buf[:m].sum()
        ce_sum += ce_buf[:m].sum()
        grad = student  # now the chunk's logit gradient
        if grad_hidden is not None:
            torch.mm(grad, student_weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            _accumulate_mm(grad_weight, grad.t(), hidden)
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=torch.float32)
    return kl_sum, ce_sum


def _gradient_buffers(student_head_input, student_weight, student_bias, grad_inputs):
    """Zeroed fp32 accumulators for the weight and bias, the hidden gradient uninitialised (every row is
    written); None where ``grad_inputs`` says no gradient is wanted."""
    want_hidden, want_weight, want_bias = grad_inputs
    grad_hidden = torch.empty_like(student_head_input) if want_hidden else None
    grad_weight = (torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
                   if want_weight else None)
    grad_bias = (torch.zeros(student_bias.shape, dtype=torch.float32, device=student_bias.device)
                 if want_bias and student_bias is not None else None)
    return grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("distil::linear_kl_ce", mutates_args=())
def _linear_kl_ce(student_head_input: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
                  teacher_head_input: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                  teacher_bias: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  labels: Optional[torch.Tensor], kl_mask: Optional[torch.Tensor], coef: torch.Tensor,
                  temperature: float, ignore_index: int, chunk_rows: int, grad_inputs: List[bool],
                  sync_free: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl_sum, ce_sum, grad_hidden, grad_weight, grad_bias) for 2-D hidden rows; a gradient not asked for
    by ``grad_inputs`` (hidden, weight, bias) is an empty tensor. ``sync_free`` is for the backward."""
    grads = None
    if any(grad_inputs):
        grads = _gradient_buffers(student_head_input, student_weight, student_bias, grad_inputs)
    with torch.autocast(student_head_input.device.type, enabled=False):
        kl_sum, ce_sum = _run_chunks(student_head_input, student_weight, student_bias, teacher_head_input,
                                     teacher_weight, teacher_bias, teacher_logits, labels, kl_mask, coef, temperature,
                                     ignore_index, chunk_rows, grads)
    grad_hidden, grad_weight, grad_bias = grads if grads is not None else (None, None, None)
    return (
        kl_sum, ce_sum,
        student_head_input.new_empty(0) if grad_hidden is None else grad_hidden,
        student_head_input.new_empty(0) if grad_weight is None else grad_weight.to(student_weight.dtype),
        student_head_input.new_empty(0) if grad_bias is None else grad_bias.to(student_bias.dtype),
    )


@_linear_kl_ce.register_fake
def _linear_kl_ce_fake(student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight,
                       teacher_bias, teacher_logits, labels, kl_mask, coef, temperature, ignore_index, chunk_rows,
                       grad_inputs, sync_free):
    want_hidden, want_weight, want_bias = grad_inputs
    return (
        student_head_input.new_empty((), dtype=torch.float32), student_head_input.new_empty((), dtype=torch.float32),
        torch.empty_like(student_head_input) if want_hidden else student_head_input.new_empty(0),
        torch.empty_like(student_weight) if want_weight else student_head_input.new_empty(0),
        torch.empty_like(student_bias) if want_bias and student_bias is not None else student_head_input.new_empty(0),
    )


@torch.library.custom_op("distil::linear_kl_ce_backward",
                         mutates_args=("grad_hidden", "grad_weight", "grad_bias"))
def _linear_kl_ce_backward(grad_hidden: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor,
                           grad_sums: torch.Tensor, student_head_input: torch.Tensor, student_weight: torch.Tensor,
                           student_bias: Optional[torch.Tensor], teacher_head_input: Optional[torch.Tensor],
                           teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                           teacher_logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                           kl_mask: Optional[torch.Tensor], coef: torch.Tensor, temperature: float,
                           ignore_index: int, chunk_rows: int, sync_free: bool) -> None:
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
    want = (grad_hidden.numel() > 0, grad_weight.numel() > 0, grad_bias.numel() > 0)
    grads = _gradient_buffers(student_head_input, student_weight, student_bias, want)
    with torch.autocast(student_head_input.device.type, enabled=False):
        _run_chunks(student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias,
                    teacher_logits, labels, kl_mask, grad_sums.float().contiguous(), temperature, ignore_index,
                    chunk_rows, grads)
    for out, new in zip((grad_hidden, grad_weight, grad_bias), grads):
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
    (student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias, teacher_logits,
     labels, kl_mask, coef, temperature, ignore_index, chunk_rows, grad_inputs, sync_free) = inputs
    ctx.temperature, ctx.ignore_index, ctx.chunk_rows, ctx.sync_free = temperature, ignore_index, chunk_rows, sync_free
    ctx.compute_grad = any(grad_inputs)
    ctx.consumed = False
    # The gradient buffers are outputs but not differentiable ones; with grads not materialised autograd
    # never builds zero "gradients of the gradients" for them.
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[2:], student_head_input, student_weight, student_bias, teacher_head_input,
                          teacher_weight, teacher_bias, teacher_logits, labels, kl_mask, coef)


def _backward(ctx, grad_kl_sum, grad_ce_sum, *_grads_of_buffers):
    grad_hidden, grad_weight, grad_bias, *inputs = take_gradient_buffer(ctx, "linear_kl_ce")
    student_head_input = inputs[0]
    zero = torch.zeros((), dtype=torch.float32, device=student_head_input.device)
    grad_sums = torch.stack([zero if g is None else g.float() for g in (grad_kl_sum, grad_ce_sum)])
    torch.ops.distil.linear_kl_ce_backward(grad_hidden, grad_weight, grad_bias, grad_sums, *inputs,
                                           ctx.temperature, ctx.ignore_index, ctx.chunk_rows, ctx.sync_free)
    wanted = ctx.needs_input_grad
    return (grad_hidden if wanted[0] else None, grad_weight if wanted[1] else None,
            grad_bias if wanted[2] else None) + (None,) * 12


_linear_kl_ce.register_autograd(_backward, setup_context=_setup_context)


def _check_head(prefix, hidden, weight, bias, rows_shape, device, vocab=None):
    """hidden ``[*rows, H]`` float, weight ``[V, H]`` (V = ``vocab`` when given) and bias ``[V]`` (or None)
    of the same dtype."""
    check_tensor(f"{prefix}_hidden", hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor(f"{prefix}_weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{prefix}_weight has V = {weight.shape[0]} but student_weight has {vocab}")
    if tuple(hidden.shape[:-1]) != tuple(rows_shape):
        raise ValueError(f"{prefix}_hidden must have the row dims {tuple(rows_shape)}, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must be [V, {hidden.shape[-1]}] ({prefix}_hidden's H), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight has dtype {weight.dtype} but {prefix}_hidden has {hidden.dtype}")
    for name, t in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
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


def linear_kl_ce_loss(student_head_input, student_weight, student_bias, labels, *, teacher_head_input=None,
                      teacher_weight=None, teacher_bias=None, teacher_logits=None, temperature=2.0, kl_mask=None,
                      ignore_index=-100, kl_weight=1.0, ce_weight=1.0, chunk_rows=None):
    """:func:`distil.fused_loss.kl_ce_loss` of the LM heads' logits, without materialising them.

    Returns ``(kl, ce)`` = ``kl_ce_loss(F.linear(student_head_input, student_weight, student_bias),
    F.linear(teacher_head_input, teacher_weight, teacher_bias), labels, ...)`` (or with the precomputed
    ``teacher_logits``): the ``nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T), F.softmax(t / T))
    * T**2`` over the ``kl_mask`` rows (distiller.py's ``loss_ce``) and
    ``nn.CrossEntropyLoss(ignore_index=ignore_index)(s, labels)`` (its ``loss_mlm``). The rows are
    processed ``chunk_rows`` at a time, so beyond the inputs and the parameter gradients the memory is
    O(chunk_rows · V), not O(N · V); the gradients w.r.t. the student's hidden rows, weight and bias are
    computed during the forward for ``kl_weight * kl + ce_weight * ce`` (any other combination is still
    exact: its backward scales them, or recomputes them for a non-proportional one or, with 16-bit
    rows, for a factor outside [1/2, 2]). They reach ``.grad`` through autograd, so tied embeddings, DDP
    hooks and gradient accumulation work. The teacher gets no gradient.

    With a loss scale (GradScaler) or 1/grad_accum, announce the product, as for ``kl_ce_loss``: 16-bit
    gradients are then written at their final scale (not rescaled from underflowing values) and the
    backward is free. Weights given as 0-d device tensors make the backward decide on the device (no
    host sync, the trainer's default step): there it must then be a multiple of the announced
    combination within the rescale rule above, or the gradients come out NaN on CUDA (CPU recomputes).

    Args:
        student_head_input: ``[N, Hs]`` or ``[B, S, Hs]`` rows after the student head's transform, fp32/bf16/fp16.
        student_weight, student_bias: the student's output projection ``[V, Hs]`` and ``[V]`` (bias may be
            None), in ``student_head_input``'s dtype (under autocast all run in the autocast dtype).
        labels: int64/int32 over the row dims, ``[0, V)`` or ``ignore_index``; None computes no CE (ce = 0).
        teacher_head_input, teacher_weight, teacher_bias: the teacher's rows ``[.., Ht]`` (Ht may differ from
            Hs) and projection ``[V, Ht]``, ``[V]``; or instead ``teacher_logits`` ``[.., V]``. Without a
            teacher no KL is computed (kl = 0).
        temperature, kl_mask, ignore_index: as in ``kl_ce_loss``.
        kl_weight, ce_weight: numbers >= 0 or one-element float tensors on the rows' device, as in
            ``kl_ce_loss``.
        chunk_rows: rows per chunk; None picks :func:`auto_chunk_rows` (a byte budget of the two
            ``[rows, V]`` buffers).
    Returns:
        ``(kl, ce)`` fp32 scalars; each is exactly 0 when it has no rows.
    """
    check_tensor("student_head_input", student_head_input, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    rows_shape, device = student_head_input.shape[:-1], student_head_input.device
    student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias = _autocast(
        device, student_head_input, student_weight, student_bias, teacher_head_input, teacher_weight, teacher_bias)
    _check_head("student", student_head_input, student_weight, student_bias, rows_shape, device)
    vocab = student_weight.shape[0]
    if teacher_logits is not None and (teacher_head_input is not None or teacher_weight is not None):
        raise ValueError("pass either teacher_logits or teacher_head_input + teacher_weight, not both")
    if (teacher_head_input is None) != (teacher_weight is None) or (
            teacher_bias is not None and teacher_weight is None):
        raise ValueError("teacher_head_input and teacher_weight (and teacher_bias) go together")
    if teacher_weight is not None:
        _check_head("teacher", teacher_head_input, teacher_weight, teacher_bias, rows_shape, device, vocab)
        teacher_head_input = teacher_head_input.detach().reshape(-1, teacher_head_input.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits, dtypes=FLOAT_DTYPES)
        if tuple(teacher_logits.shape) != (*rows_shape, vocab) or teacher_logits.device != device:
            raise ValueError(f"teacher_logits must be {(*rows_shape, vocab)} on {device}, "
                             f"got {tuple(teacher_logits.shape)} on {teacher_logits.device}")
        teacher_logits = teacher_logits.detach().reshape(-1, vocab)
        if vocab > 1 and teacher_logits.stride(-1) != 1:
            teacher_logits = teacher_logits.contiguous()
    temperature = check_temperature("temperature", temperature)
    kl_mask = check_row_mask("kl_mask", kl_mask, rows_shape, device)
    kl_weight = check_weight("kl_weight", kl_weight, device)
    ce_weight = check_weight("ce_weight", ce_weight, device)
    sync_free = isinstance(kl_weight, torch.Tensor) or isinstance(ce_weight, torch.Tensor)
    if chunk_rows is not None:
        chunk_rows = check_int("chunk_rows", chunk_rows, 1)
    has_teacher = teacher_weight is not None or teacher_logits is not None
    kl_count = row_count(kl_mask, rows_shape) if has_teacher else 0
    ce_count = 0
    ignore_index = check_int("ignore_index", ignore_index)
    if labels is not None:
        labels, labelled = check_labels(labels, rows_shape, vocab, device, ignore_index)
        labels = labels.reshape(-1)
        ce_count = labelled.sum()
    coef = torch.stack([announced_coef(kl_weight if has_teacher else 0.0, kl_count, device),
                        announced_coef(ce_weight if labels is not None else 0.0, ce_count, device)])
    n_rows = rows_shape.numel()
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(n_rows, vocab, student_head_input.element_size())
    grad_on = torch.is_grad_enabled()
    grad_inputs = [grad_on and t is not None and t.requires_grad
                   for t in (student_head_input, student_weight, student_bias)]
    kl_sum, ce_sum, *_ = torch.ops.distil.linear_kl_ce(
        student_head_input.reshape(-1, student_head_input.shape[-1]), student_weight, student_bias, teacher_head_input,
        teacher_weight, teacher_bias, teacher_logits, labels, None if kl_mask is None else kl_mask.reshape(-1),
        coef, temperature, ignore_index, chunk_rows, grad_inputs, sync_free,
    )
    return kl_sum / divisor(kl_count), ce_sum / divisor(ce_count)


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
    ``model.get_output_embeddings()``; the teacher's may be None when precomputed teacher logits are
    passed), called with the rows *after each head's transform*, i.e. what the projection multiplies:

    - BERT (``BertForMaskedLM``): ``cls.predictions.transform(sequence_output)`` (dense → GELU → LayerNorm),
      projection ``cls.predictions.decoder`` (tied to the word embeddings);
    - DistilBERT: ``vocab_layer_norm(gelu(vocab_transform(hidden)))``, projection ``vocab_projector``;
    - RoBERTa: ``lm_head.layer_norm(gelu(lm_head.dense(hidden)))``, projection ``lm_head.decoder``;
    - LLaMA-style decoders: the final norm's output (``model.norm``, i.e. ``outputs.hidden_states[-1]``),
      projection ``lm_head`` (no bias).

    The heads are submodules, so the module can be sharded with FSDP2: ``fully_shard(loss_module)`` gathers
    the heads' weights in its forward and reduce-scatters their gradients in the backward.
    """

    def __init__(self, student_head, teacher_head=None, *, temperature=2.0, ignore_index=-100, kl_weight=1.0,
                 ce_weight=1.0, chunk_rows=None):
        super().__init__()
        _head_params("student_head", student_head)
        if teacher_head is not None:
            _head_params("teacher_head", teacher_head)
        self.student_head = student_head
        self.teacher_head = teacher_head
        self.temperature = check_temperature("temperature", temperature)
        self.ignore_index = ignore_index
        self.kl_weight = check_non_negative_finite("kl_weight", kl_weight)
        self.ce_weight = check_non_negative_finite("ce_weight", ce_weight)
        self.chunk_rows = chunk_rows

    def extra_repr(self):
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, kl_weight={self.kl_weight}, "
                f"ce_weight={self.ce_weight}, chunk_rows={self.chunk_rows}")

    def forward(self, student_head_input, labels, teacher_head_input=None, *, teacher_logits=None, kl_mask=None,
                kl_weight=None, ce_weight=None):
        """``(kl, ce)`` of ``linear_kl_ce_loss`` with this module's heads and settings; ``kl_weight`` /
        ``ce_weight`` (numbers or 0-d device tensors, e.g. with a loss scale) replace the module's for
        this call."""
        weight, bias = _head_params("student_head", self.student_head)
        teacher = {"teacher_logits": teacher_logits}
        if teacher_head_input is not None:
            if self.teacher_head is None:
                raise ValueError("teacher_head_input needs a teacher_head (or pass teacher_logits)")
            t_weight, t_bias = _head_params("teacher_head", self.teacher_head)
            teacher.update(teacher_head_input=teacher_head_input, teacher_weight=t_weight, teacher_bias=t_bias)
        return linear_kl_ce_loss(student_head_input, weight, bias, labels, temperature=self.temperature,
                                 kl_mask=kl_mask, ignore_index=self.ignore_index,
                                 kl_weight=self.kl_weight if kl_weight is None else kl_weight,
                                 ce_weight=self.ce_weight if ce_weight is None else ce_weight,
                                 chunk_rows=self.chunk_rows, **teacher)
