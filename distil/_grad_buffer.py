"""Autograd of the "gradient in the forward" ops (ARCHITECTURE.md), shared by every loss op: the
forward's gradient buffer is saved, and the backward rewrites it in place (once) into the gradient."""


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
