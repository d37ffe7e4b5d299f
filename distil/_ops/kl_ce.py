"""``distil::kl_ce_rows``: its registration (the Triton kernel for CUDA, a fake impl for tracing,
autograd) and the public :func:`kl_div_loss` and :func:`kl_ce_loss` (re-exported by
:mod:`distil.fused_loss`). Schema and CPU kernel: csrc/kl_ce.cpp; Triton kernel: kernels/kl_ce.py.
"""
import torch

from distil._ops.common import (
    FLOAT_DTYPES,
    check_alike,
    check_float_rows,
    check_kl_ce_args,
    check_op_rows,
    check_row_mask,
    check_tensor,
    check_unit_last_stride,
    check_weight,
    device_guard,
    divisor,
    kl_ce_coef,
    loss_coef,
    needs_grad,
    row_count,
)
from distil._ops.divergence import JSD_BETA, SKEW_ALPHA, check_divergence
from distil._ops.registry import register_gradient_op, register_triton, triton_kernels
from distil.checks import check_choice, check_temperature

_KL_REDUCTIONS = ("batchmean", "sum", "none")


def _check_op_args(student, teacher, labels, kl_mask, coef, *_scalars):
    check_op_rows("kl_ce_rows", student, teacher)
    rows = student.shape[:-1]
    if labels is not None and (labels.shape != rows or labels.dtype != torch.int64):
        raise ValueError(f"kl_ce_rows: labels must be int64 of shape {tuple(rows)}")
    if kl_mask is not None and (kl_mask.shape != rows or kl_mask.dtype != torch.bool):
        raise ValueError(f"kl_ce_rows: kl_mask must be bool of shape {tuple(rows)}")
    if coef.shape != (2,) or coef.dtype != torch.float32:
        raise ValueError("kl_ce_rows: coef must be a float32 tensor of shape [2]")


_kernels = triton_kernels("kl_ce")
register_gradient_op("kl_ce_rows", 2, _check_op_args, _kernels)


def kl_ce_rows_into_triton(student, teacher, labels, kl_mask, coef, temperature, ignore_index, kl_rows, ce_rows, grad,
                           divergence="forward_kl", divergence_param=0.0):
    """kl_ce_rows into the caller's buffers (the fused LM heads' chunks), on the Triton kernel."""
    _check_op_args(student, teacher, labels, kl_mask, coef)
    rows = student.shape[:-1]
    for name, x in (("kl_rows", kl_rows), ("ce_rows", ce_rows)):
        if x.shape != rows or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"kl_ce_rows_into: {name} must be contiguous float32 of shape {tuple(rows)}")
    if grad is not None and (grad.shape != student.shape or grad.dtype != student.dtype or not grad.is_contiguous()):
        raise ValueError("kl_ce_rows_into: grad must be contiguous with the student's shape and dtype")
    with device_guard(student):
        _kernels.kl_ce_rows(student, teacher, None if labels is None else labels.contiguous(),
                            None if kl_mask is None else kl_mask.contiguous(), coef, temperature, ignore_index,
                            kl_rows, ce_rows, grad, divergence, divergence_param)


if _kernels is not None:
    register_triton("kl_ce_rows_into", kl_ce_rows_into_triton)
torch.library.register_fake("distil::kl_ce_rows_into", lambda *args: None)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------
def check_teacher_logits(teacher_logits, student_logits):
    """The teacher's logits beside the (checked) student's: float, the same shape and device, unit stride
    along V. Returns them detached."""
    check_tensor("teacher_logits", teacher_logits, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_alike("teacher_logits", teacher_logits, "student_logits", student_logits)
    check_unit_last_stride("teacher_logits", teacher_logits)
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        # The teacher gets no gradient; a trainer that forgot torch.no_grad() would silently get None.
        teacher_logits = teacher_logits.detach()
    return teacher_logits


def kl_div_loss(student_logits, teacher_logits, *, temperature=2.0, mask=None, reduction="batchmean", weight=1.0,
                divergence="forward_kl", jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
    """Temperature-scaled KL divergence of the student from the teacher (or another divergence), times T².

    Exactly ``nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2``
    on the selected rows, as ``loss_ce`` in distiller.py's ``Distiller.step`` (which selects the rows
    with ``masked_select``); here the rows are selected without copying. ``divergence`` replaces the
    forward KL by the reverse KL, the generalized JSD (TRL's ``generalized_jsd_loss``), a skew KL or the
    total variation distance, defined in :mod:`distil._ops.divergence`.

    Args:
        student_logits, teacher_logits: ``[N, V]`` or ``[B, S, V]``, float32/bfloat16/float16 (may differ),
            contiguous along V. The teacher gets no gradient.
        temperature: T in [2**-126, 2**63) (1/T and T² finite in float32); accurate as eager fp32 or
            better up to T = 1000, never negative beyond.
        mask: optional bool or integer (nonzero = selected) ``[N]`` / ``[B, S]``; rows where it is False / 0
            are left out (default: all rows).
        reduction: ``"batchmean"`` (sum over selected rows / their count), ``"sum"``, or ``"none"``
            (per-row T²·KL of shape ``[N]`` / ``[B, S]``, zero at unselected rows: the row sums of
            PyTorch's element-wise ``"none"`` output, times T²).
        weight: the factor you will multiply the loss by before ``backward()`` (a number, or a one-element
            float tensor on the logits' device: no host sync), as ``kl_weight`` of :func:`kl_ce_loss`; it
            does not change the value.
        divergence: ``"forward_kl"`` (default), ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``,
            ``"skew_reverse_kl"`` or ``"tvd"``.
        jsd_beta: β of ``"jsd"``, in [0, 1] (0: forward KL, 1: reverse KL).
        skew_alpha: α of ``"skew_kl"`` / ``"skew_reverse_kl"``, in [0, 1) (0: the plain KL). A parameter
            set for another divergence is refused.
    Returns:
        fp32 tensor: a scalar, or per-row losses for ``"none"``. No selected rows gives 0.
    """
    divergence, divergence_param = check_divergence(divergence, jsd_beta, skew_alpha)
    temperature = check_temperature("temperature", temperature)
    reduction = check_choice("reduction", reduction, _KL_REDUCTIONS)
    check_float_rows("student_logits", student_logits)
    teacher_logits = check_teacher_logits(teacher_logits, student_logits)
    mask = check_row_mask("mask", mask, student_logits.shape[:-1], student_logits.device)
    weight = check_weight("weight", weight, student_logits.device)
    return kl_div_core(student_logits, teacher_logits, mask, temperature, reduction, weight, divergence,
                       divergence_param)


def kl_div_core(student_logits, teacher_logits, mask, temperature, reduction, weight, divergence, divergence_param):
    """:func:`kl_div_loss` on checked arguments: ``mask`` bool or None, the divergence as
    :func:`~distil.checks.check_divergence` returns it."""
    count = row_count(mask, student_logits.shape[:-1]) if reduction == "batchmean" else 1
    coef = loss_coef(weight, count, 0.0, 1, student_logits.device)
    kl_rows, _, _ = torch.ops.distil.kl_ce_rows(
        student_logits, teacher_logits, None, mask, coef, temperature, -100, needs_grad(student_logits),
        divergence, divergence_param,
    )
    if reduction == "none":
        return kl_rows
    return kl_rows.sum() / divisor(count)


def kl_ce_loss(student_logits, teacher_logits, labels, *, temperature=2.0, kl_mask=None, ignore_index=-100,
               kl_weight=1.0, ce_weight=1.0, divergence="forward_kl", jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
    """The distillation KL and the masked-LM cross-entropy in one kernel launch over the student logits.

    Returns ``(kl, ce)`` with
    ``kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2``
    over the ``kl_mask`` rows (all rows by default; distiller.py's ``loss_ce``) and
    ``ce = nn.CrossEntropyLoss(ignore_index=ignore_index)(s, labels)`` at temperature 1 (its ``loss_mlm``).
    With ``divergence``, ``kl`` is another divergence times T², as in :func:`kl_div_loss` (e.g. TRL's GKD
    loss: ``divergence="jsd", jsd_beta=β``).

    ``kl_weight`` and ``ce_weight`` do not change the values: they name the combination
    ``kl_weight * kl + ce_weight * ce`` that you will backpropagate, for which the gradient is written
    during the forward (backward then costs nothing). Any other combination is still exact; its
    backward scales or recomputes the gradient rows. DistilBERT's recipe is ``kl_weight=5.0, ce_weight=2.0``;
    with a loss scale (GradScaler) or 1/grad_accum, announce the product, e.g.
    ``kl_weight=scale * 5.0`` for ``(scale * (5.0 * kl + 2.0 * ce)).backward()``: a 0-d float tensor on the
    logits' device is accepted (no host sync).

    Args:
        student_logits, teacher_logits: ``[N, V]`` or ``[B, S, V]`` float32/bfloat16/float16, contiguous along V.
        labels: int64/int32 ``[N]`` / ``[B, S]``, in ``[0, V)`` or ``ignore_index``.
        temperature: T for the KL, as in :func:`kl_div_loss`; the cross-entropy uses T = 1.
        kl_mask: optional bool or integer (nonzero = selected) ``[N]`` / ``[B, S]`` selecting the KL rows
            (``--restrict_ce_to_mask`` in distiller.py is ``kl_mask = labels != -100``).
        ignore_index: an int (Python or NumPy).
        kl_weight, ce_weight: numbers >= 0 or one-element float tensors on the logits' device.
        divergence, jsd_beta, skew_alpha: the divergence in place of the forward KL, as in :func:`kl_div_loss`.
    Returns:
        ``(kl, ce)``: fp32 scalars; each is exactly 0 when it has no rows.
    """
    (divergence, divergence_param, temperature, ignore_index, kl_mask, labels, labelled, kl_weight,
     ce_weight) = check_kl_ce_args(student_logits, kl_mask, labels, kl_weight, ce_weight, temperature, ignore_index,
                                   divergence, jsd_beta, skew_alpha)
    teacher_logits = check_teacher_logits(teacher_logits, student_logits)
    return kl_ce_core(student_logits, teacher_logits, labels, labelled, kl_mask, temperature, ignore_index, kl_weight,
                      ce_weight, divergence, divergence_param)


def kl_ce_core(student_logits, teacher_logits, labels, labelled, kl_mask, temperature, ignore_index, kl_weight,
               ce_weight, divergence, divergence_param):
    """:func:`kl_ce_loss` on checked arguments: ``(labels, labelled)`` as :func:`check_labels` returns them,
    ``kl_mask`` bool or None, the divergence as :func:`~distil.checks.check_divergence` returns it."""
    coef, kl_count, ce_count = kl_ce_coef(kl_weight, kl_mask, ce_weight, labelled, student_logits.shape[:-1],
                                          student_logits.device)
    kl_rows, ce_rows, _ = torch.ops.distil.kl_ce_rows(
        student_logits, teacher_logits, labels, kl_mask, coef, temperature, ignore_index,
        needs_grad(student_logits), divergence, divergence_param,
    )
    return kl_rows.sum() / divisor(kl_count), ce_rows.sum() / divisor(ce_count)
