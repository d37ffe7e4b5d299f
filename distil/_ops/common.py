"""What every op shares: the tensor checks of the public functions (each raises a clear TypeError or
ValueError naming the argument; the scalar checks are :mod:`distil.checks`), and the "gradient in the
forward" plumbing (ARCHITECTURE.md): the coefficients the forward prepares its gradient for, and the
autograd side, where the forward's gradient buffer is saved and the backward rewrites it in place
(once) into the gradient."""
import contextlib
from typing import NamedTuple, Optional

import torch

from distil.checks import check_divergence, check_int, check_non_negative_finite, check_temperature

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name, t, *, dtypes=None, ndims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    if ndims is not None and t.dim() not in ndims:
        allowed = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {allowed}, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors):
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_alike(name, t, like_name, like):
    """``t`` on ``like``'s device with ``like``'s shape (both tensors already checked)."""
    check_same_device(**{like_name: like, name: t})
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has shape {tuple(like.shape)}")


def check_unit_last_stride(name, t):
    """The kernels read rows with a unit stride along the last dim; other dims may have any strides."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}; "
                         "pass .contiguous() (distil never copies it silently)")


def check_float_rows(name, t):
    """Float rows a kernel reads in place: ``[N, D]`` or ``[B, S, D]``, unit stride along D."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_unit_last_stride(name, t)


def check_op_rows(op, student, teacher):
    """What the Triton kernels assume, checked at the op's CUDA entry (direct torch.ops calls skip the
    public functions; the CPU kernels check the same in C++)."""
    if student.shape != teacher.shape or student.dim() not in (2, 3):
        raise ValueError(f"{op}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must be equal [N, D] or [B, S, D] shapes")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous along its last dim, got strides {x.stride()}")


def device_guard(t):
    """Makes t's CUDA device current while a Triton kernel launches; nothing for CPU tensors (the tests
    run the Triton kernels on them through the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_token_batch(input_ids, attention_mask):
    """A batch of token ids: int64 ``input_ids`` ``[B, S]`` and an ``attention_mask`` of that shape on
    their device."""
    check_tensor("input_ids", input_ids, dtypes=(torch.int64,), ndims=(2,))
    check_tensor("attention_mask", attention_mask, ndims=(2,))
    check_alike("attention_mask", attention_mask, "input_ids", input_ids)


def check_row_mask(name, mask, rows_shape, device):
    """An optional mask over the leading (row) dims of the logits/hidden states: bool, or integer with
    nonzero = selected (Hugging Face's int64 0/1 ``attention_mask``). Returns it as bool."""
    if mask is None:
        return None
    check_tensor(name, mask)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{name} must be a bool or integer (0/1) tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(rows_shape):
        raise ValueError(f"{name} must have shape {tuple(rows_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the rows it selects are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_labels(labels, rows_shape, vocab, device, ignore_index):
    """int64/int32 ``labels`` over the row dims, each in ``[0, vocab)`` or ``ignore_index`` (an int the
    caller checked). Returns ``(labels as int64, labelled mask)``. Out-of-range labels raise on CPU; on
    CUDA (and under torch.compile) a device-side assert, as PyTorch's own cross_entropy, so that no host
    sync is needed."""
    check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer (int64 or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(f"labels must have shape {tuple(rows_shape)} (the row dims), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the rows are on {device}")
    labels = labels.long()
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), "labels out of range [0, V) (other than ignore_index)")
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
    return labels, labelled


class KLCEArgs(NamedTuple):
    """A KL+CE loss's checked arguments beside its teacher."""
    divergence: str
    divergence_param: float
    temperature: float
    ignore_index: int
    kl_mask: Optional[torch.Tensor]
    labels: torch.Tensor
    labelled: torch.Tensor
    kl_weight: object  # a float or a 0-d device tensor
    ce_weight: object


def check_kl_ce_args(student_logits, kl_mask, labels, kl_weight, ce_weight, temperature, ignore_index, divergence,
                     jsd_beta, skew_alpha):
    """What a KL+CE loss over ``student_logits`` checks beside its teacher: its scalars, then its tensors.
    Returns :class:`KLCEArgs` (kl_mask as bool or None, labels as int64)."""
    divergence, divergence_param = check_divergence(divergence, jsd_beta, skew_alpha)
    temperature = check_temperature("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    check_float_rows("student_logits", student_logits)
    rows_shape, device = student_logits.shape[:-1], student_logits.device
    kl_mask = check_row_mask("kl_mask", kl_mask, rows_shape, device)
    labels, labelled = check_labels(labels, rows_shape, student_logits.shape[-1], device, ignore_index)
    return KLCEArgs(divergence, divergence_param, temperature, ignore_index, kl_mask, labels, labelled,
                    check_weight("kl_weight", kl_weight, device), check_weight("ce_weight", ce_weight, device))


def check_weight(name, value, device):
    """A loss weight the forward prepares the gradient for: a number >= 0, or a one-element float tensor
    on ``device`` (e.g. GradScaler's scale times 1/grad_accum), taken as it is: checking its value
    would need a host sync."""
    if not isinstance(value, torch.Tensor):
        return check_non_negative_finite(name, value)
    if not value.is_floating_point() or value.numel() != 1:
        raise TypeError(f"{name} must be a number or a one-element float tensor, got {value.dtype} "
                        f"of shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the loss is computed on {device}")
    return value.detach().reshape(())


def needs_grad(student):
    """Whether the forward should write the student's gradient."""
    return torch.is_grad_enabled() and student.requires_grad


def row_count(mask, rows_shape):
    """Rows a mean runs over: all of ``rows_shape`` (a Python int) or the mask's count (a device tensor)."""
    return rows_shape.numel() if mask is None else mask.sum()


def divisor(count):
    """max(count, 1), as the losses divide by it: an fp32 tensor or a Python int (no host sync)."""
    return count.clamp(min=1).to(torch.float32) if isinstance(count, torch.Tensor) else max(count, 1)


def announced_coef(weight, count, device):
    """``weight / max(count, 1)`` as a 0-d fp32 device tensor, formed exactly as autograd forms the
    per-row gradient of ``weight * (rows.sum() / divisor(count))`` (an fp32 weight divided by n), so
    that the backward finds the factor 1 and does nothing. ``weight``: a number or a 0-d tensor."""
    if isinstance(weight, torch.Tensor):
        return weight.to(torch.float32) / divisor(count)
    return torch.full((), weight, dtype=torch.float32, device=device) / divisor(count)


def loss_coef(kl_weight, kl_count, ce_weight, ce_count, device):
    """``coef = [kl_weight / n_kl, ce_weight / n_ce]``, the fp32 device tensor the forward prepares the
    gradient for (no host sync; bit-equal to autograd's per-row gradients, see announced_coef)."""
    return torch.stack([announced_coef(kl_weight, kl_count, device), announced_coef(ce_weight, ce_count, device)])


def kl_ce_coef(kl_weight, kl_mask, ce_weight, labelled, rows_shape, device):
    """``(coef, kl_count, ce_count)`` of a KL+CE loss: the KL over the ``kl_mask`` rows (all of
    ``rows_shape`` without a mask), the CE over the ``labelled`` ones (none when None)."""
    kl_count, ce_count = row_count(kl_mask, rows_shape), 0 if labelled is None else labelled.sum()
    return loss_coef(kl_weight, kl_count, ce_weight, ce_count, device), kl_count, ce_count


def save_gradient_buffer(ctx, buffer, compute_grad, *tensors):
    """setup_context part: save ``buffer`` (an op output, or a tuple of them) and ``tensors`` for the
    backward.

    The buffer is an output but not a differentiable one: marked so, and with grads not materialised,
    autograd never builds a zero buffer-sized "gradient of the gradient" per backward."""
    buffers = tuple(buffer) if isinstance(buffer, (tuple, list)) else (buffer,)
    ctx.compute_grad = compute_grad
    ctx.consumed = False
    ctx.mark_non_differentiable(*buffers)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*buffers, *tensors)


def take_gradient_buffer(ctx, op_name):
    """backward part: the saved (buffer, *tensors), once; a clear error for a missing or reused buffer,
    and for create_graph=True (grad mode on in the backward), which would get no second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"distil: {op_name} has no double backward: its gradient is written by the forward, so "
            "create_graph=True (gradient penalties, Hessian-vector products) is not supported; use the "
            "eager loss (distil.reference) for that"
        )
    if not ctx.compute_grad:
        raise RuntimeError(
            f"distil: {op_name} ran with compute_grad=False, so it has no gradient; "
            "call the loss with grad enabled and a student that requires grad"
        )
    if ctx.consumed:
        raise RuntimeError(
            f"distil: {op_name} rewrites its gradient buffer in place during backward, so it can be "
            "backpropagated once only (retain_graph=True double backward is not supported)"
        )
    ctx.consumed = True
    return ctx.saved_tensors
