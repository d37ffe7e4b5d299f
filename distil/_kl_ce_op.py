"""Registration of ``distil::kl_ce_rows``: the Triton kernel for CUDA, a fake impl for tracing,
and autograd (the gradient is written by the forward; see ARCHITECTURE.md).

The schema and the CPU kernel are C++ (csrc/ops.cpp, csrc/kl_ce_cpu.cpp).
"""
import torch

import distil  # noqa: F401  (loads the schemas)
from distil._grad_buffer import save_gradient_buffer, take_gradient_buffer

try:  # Triton is a Linux-only dependency; without it CUDA tensors have no kernel.
    from distil.kernels import kl_ce as _triton_kl_ce
except ImportError:  # pragma: no cover
    _triton_kl_ce = None

def _check_op_args(student, teacher, labels, kl_mask, coef):
    """What the Triton kernel assumes, for direct calls of the op (distil.fused_loss validates more)."""
    if student.shape != teacher.shape or student.dim() not in (2, 3):
        raise ValueError(f"kl_ce_rows: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must be equal [N, V] or [B, S, V] shapes")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"kl_ce_rows: {name} must be contiguous along V, got strides {x.stride()}")
    rows = student.shape[:-1]
    if labels is not None and (labels.shape != rows or labels.dtype != torch.int64):
        raise ValueError(f"kl_ce_rows: labels must be int64 of shape {tuple(rows)}")
    if kl_mask is not None and (kl_mask.shape != rows or kl_mask.dtype != torch.bool):
        raise ValueError(f"kl_ce_rows: kl_mask must be bool of shape {tuple(rows)}")
    if coef.shape != (2,) or coef.dtype != torch.float32:
        raise ValueError("kl_ce_rows: coef must be a float32 tensor of shape [2]")


if _triton_kl_ce is not None:

    @torch.library.register_kernel("distil::kl_ce_rows", "cuda")
    def _kl_ce_rows_cuda(student, teacher, labels, kl_mask, coef, temperature, ignore_index, compute_grad):
        _check_op_args(student, teacher, labels, kl_mask, coef)
        with torch.cuda.device(student.device):
            return _triton_kl_ce.kl_ce_rows(
                student, teacher, labels, kl_mask, coef, temperature, ignore_index, compute_grad
            )

    @torch.library.register_kernel("distil::kl_ce_rows_backward", "cuda")
    def _kl_ce_rows_backward_cuda(grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef,
                                  temperature, ignore_index):
        _check_op_args(student, teacher, labels, kl_mask, coef)
        if grad.shape != student.shape or not grad.is_contiguous():
            raise ValueError("kl_ce_rows_backward: grad must be contiguous with the student's shape")
        with torch.cuda.device(student.device):
            _triton_kl_ce.kl_ce_rows_backward(
                grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef, temperature, ignore_index
            )


@torch.library.register_fake("distil::kl_ce_rows")
def _kl_ce_rows_fake(student, teacher, labels, kl_mask, coef, temperature, ignore_index, compute_grad):
    rows = student.shape[:-1]
    kl = student.new_empty(rows, dtype=torch.float32)
    ce = student.new_empty(rows, dtype=torch.float32)
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty(0)
    return kl, ce, grad


@torch.library.register_fake("distil::kl_ce_rows_backward")
def _kl_ce_rows_backward_fake(grad, grad_kl_rows, grad_ce_rows, student, teacher, labels, kl_mask, coef,
                              temperature, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    student, teacher, labels, kl_mask, coef, temperature, ignore_index, compute_grad = inputs
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    save_gradient_buffer(ctx, output[2], compute_grad, student, teacher, labels, kl_mask, coef)


def _backward(ctx, grad_kl_rows, grad_ce_rows, _grad_of_grad):
    grad, student, teacher, labels, kl_mask, coef = take_gradient_buffer(ctx, "kl_ce_rows")
    if grad_kl_rows is None:
        grad_kl_rows = torch.zeros(student.shape[:-1], dtype=torch.float32, device=student.device)
    if grad_ce_rows is None:
        grad_ce_rows = torch.zeros(student.shape[:-1], dtype=torch.float32, device=student.device)
    torch.ops.distil.kl_ce_rows_backward(
        grad, grad_kl_rows.float(), grad_ce_rows.float(), student, teacher, labels, kl_mask, coef,
        ctx.temperature, ctx.ignore_index,
    )
    return grad, None, None, None, None, None, None, None


torch.library.register_autograd("distil::kl_ce_rows", _backward, setup_context=_setup_context)
