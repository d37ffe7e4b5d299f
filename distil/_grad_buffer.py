"""Plumbing of the "gradient in the forward" ops (ARCHITECTURE.md), shared by every loss op: the
coefficients the forward prepares its gradient for, and the autograd side, where the forward's
gradient buffer is saved and the backward rewrites it in place (once) into the gradient."""
import torch


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
    that the backward finds the factor 1 and does nothing."""
    return torch.full((), weight, dtype=torch.float32, device=device) / divisor(count)


def save_gradient_buffer(ctx, buffer, compute_grad, *tensors):
    """setup_context part: save ``buffer`` (an op output) and ``tensors`` for the backward.

    The buffer is an output but not a differentiable one: marked so, and with grads not materialised,
    autograd never builds a zero buffer-sized "gradient of the gradient" per backward."""
    ctx.compute_grad = compute_grad
    ctx.consumed = False
    ctx.mark_non_differentiable(buffer)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(buffer, *tensors)


def take_gradient_buffer(ctx, op_name):
    """backward part: the saved (buffer, *tensors), once; a clear error for a missing or reused buffer."""
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
