"""``distil::cosine_rows``: its registration (the Triton kernel for CUDA, a fake impl for tracing,
autograd) and the public :func:`cosine_loss` (re-exported by :mod:`distil.fused_loss`). Schema and
CPU kernel: csrc/cosine.cpp; Triton kernel: kernels/cosine.py.
"""
import torch

from distil._ops.common import (
    FLOAT_DTYPES,
    announced_coef,
    check_alike,
    check_float_rows,
    check_op_rows,
    check_row_mask,
    check_tensor,
    check_unit_last_stride,
    check_weight,
    divisor,
    needs_grad,
    row_count,
)
from distil._ops.registry import register_gradient_op, triton_kernels


def _check_op_args(student, teacher, mask, coef):
    check_op_rows("cosine_rows", student, teacher)
    if mask is not None and (mask.shape != student.shape[:-1] or mask.dtype != torch.bool):
        raise ValueError(f"cosine_rows: mask must be bool of shape {tuple(student.shape[:-1])}")
    if coef.numel() != 1 or coef.dtype != torch.float32:
        raise ValueError("cosine_rows: coef must be one float32 value")


register_gradient_op("cosine_rows", 1, _check_op_args, triton_kernels("cosine"))


def cosine_loss(student_hidden, teacher_hidden, *, mask=None, weight=1.0):
    """Mean over the selected rows of ``1 − cos(student_row, teacher_row)``.

    Exactly ``nn.CosineEmbeddingLoss(reduction="mean")(s, t, torch.ones(n))`` on the selected rows
    (distiller.py's ``loss_cos``, which selects them with ``masked_select`` on a ``[B, S, H]``-expanded
    mask), including its epsilon: ``cos = Σst / sqrt((Σs² + 1e-12)(Σt² + 1e-12))``, so a zero
    vector has cos 0 (``F.cosine_similarity`` clamps the norms instead).  The rows are read in place,
    math is fp32, and the gradient w.r.t. the student is written during the forward.

    Args:
        student_hidden, teacher_hidden: ``[N, H]`` or ``[B, S, H]`` float32/bfloat16/float16 (dtypes
            may differ), same shape, contiguous along H.  The teacher gets no gradient.
        mask: optional bool or integer ``[N]`` / ``[B, S]`` (e.g. Hugging Face's int64 0/1 attention
            mask); rows where it is False / 0 are left out (default: all rows). Float masks are rejected.
        weight: the factor you will multiply this loss by before ``backward()`` (``alpha_cos``, times a
            loss scale if any): a number, or a one-element float tensor on the hidden states' device (no
            host sync).  It does not change the value; the gradient for exactly that weight is prepared
            in the forward, so the backward costs nothing.  Any other upstream gradient is still exact (a
            scaling pass, or a recomputation where a 16-bit gradient would lose precision).
    Returns:
        fp32 scalar; exactly 0 (with a zero gradient) when no row is selected.
    """
    teacher_hidden = check_hidden(student_hidden, teacher_hidden)
    mask = check_row_mask("mask", mask, student_hidden.shape[:-1], student_hidden.device)
    weight = check_weight("weight", weight, student_hidden.device)
    return cosine_core(student_hidden, teacher_hidden, mask, weight)


def check_hidden(student_hidden, teacher_hidden):
    """The two hidden-state tensors of :func:`cosine_loss`; returns the teacher's detached."""
    check_float_rows("student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"student_hidden has hidden size {student_hidden.shape[-1]} but teacher_hidden has "
            f"{teacher_hidden.shape[-1]}: the cosine loss needs equal sizes, so project one of them "
            f"first (e.g. an nn.Linear({student_hidden.shape[-1]}, {teacher_hidden.shape[-1]}) on the student)"
        )
    check_alike("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
    check_unit_last_stride("teacher_hidden", teacher_hidden)
    if teacher_hidden.requires_grad and torch.is_grad_enabled():
        teacher_hidden = teacher_hidden.detach()  # the teacher is a constant target
    return teacher_hidden


def cosine_core(student_hidden, teacher_hidden, mask, weight):
    """:func:`cosine_loss` on checked arguments (:func:`check_hidden`; ``mask`` bool or None)."""
    count = row_count(mask, student_hidden.shape[:-1])
    coef = announced_coef(weight, count, student_hidden.device).reshape(1)
    loss_rows, _ = torch.ops.distil.cosine_rows(student_hidden, teacher_hidden, mask, coef,
                                                needs_grad(student_hidden))
    return loss_rows.sum() / divisor(count)
