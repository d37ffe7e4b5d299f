"""The public loss API of distil: fused DistilBERT losses that other trainers import.

Every function takes raw logits (or hidden states) of shape ``[N, D]`` or ``[B, S, D]`` with row
masks / labels of shape ``[N]`` / ``[B, S]``; nothing of shape ``[..., D]`` is copied. CUDA tensors
run the Triton kernels of :mod:`distil.kernels`, CPU tensors the C++ kernels of ``distil._C``; both
have the same semantics. The gradient w.r.t. the student is computed in the forward pass, so the
backward is free when you backpropagate the combination named by ``kl_weight`` / ``ce_weight`` and
at most one scaling pass otherwise. The teacher never receives a gradient.

Differences from PyTorch, by design: when no row is selected the losses are exactly 0 with a zero
gradient (PyTorch's ``batchmean`` / ``mean`` give NaN there), and a row whose logits are all -inf
contributes 0 (see the -inf policy in ARCHITECTURE.md).
"""
import torch

from distil import _kl_ce_op  # noqa: F401  (registers the op's CUDA kernel, fake impl and autograd)
from distil._grad_buffer import announced_coef, divisor, needs_grad, row_count
from distil._validate import (
    check_non_negative_finite,
    check_pair,
    check_positive_finite,
    check_row_mask,
    check_tensor,
)

__all__ = ["kl_div_loss", "kl_ce_loss", "cosine_loss", "linear_kl_ce_loss", "LinearKLCELoss", "DistillationLoss",
           "DistillationLossOutput"]

_KL_REDUCTIONS = ("batchmean", "sum", "none")


def _check_logits(student_logits, teacher_logits):
    check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if t.shape[-1] > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (vocabulary) dimension, got strides {t.stride()}")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        # The teacher gets no gradient; a trainer that forgot torch.no_grad() would silently get None.
        teacher_logits = teacher_logits.detach()
    return teacher_logits


def _check_labels(labels, student_logits, ignore_index):
    check_tensor("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer (int64 or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits' row dims), got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student_logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.long()
    vocab = student_logits.shape[-1]
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda or torch.compiler.is_compiling():
        # No host sync: a device-side assert, as PyTorch's own cross_entropy does on CUDA.
        torch._assert_async(~bad.any(), "labels out of range [0, V) (other than ignore_index)")
    elif bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")
    return labels, labelled


def _coef(kl_weight, kl_count, ce_weight, ce_count, device):
    """[kl_weight / n_kl, ce_weight / n_ce] as a device tensor, without a host sync (see announced_coef)."""
    return torch.stack([announced_coef(kl_weight, kl_count, device), announced_coef(ce_weight, ce_count, device)])


def kl_div_loss(student_logits, teacher_logits, *, temperature=2.0, mask=None, reduction="batchmean"):
    """Temperature-scaled KL divergence of the student from the teacher, times T².

    Exactly ``nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2``
    on the selected rows, as ``loss_ce`` in distiller.py's ``Distiller.step`` (which selects the rows
    with ``masked_select``); here the rows are selected without copying.

    Args:
        student_logits, teacher_logits: ``[N, V]`` or ``[B, S, V]``, float32/bfloat16/float16 (may differ),
            contiguous along V. The teacher gets no gradient.
        temperature: T > 0, finite.
        mask: optional bool ``[N]`` / ``[B, S]``; rows where it is False are left out (default: all rows).
        reduction: ``"batchmean"`` (sum over selected rows / their count), ``"sum"``, or ``"none"``
            (per-row T²·KL of shape ``[N]`` / ``[B, S]``, zero at unselected rows: the row sums of
            PyTorch's element-wise ``"none"`` output, times T²).
    Returns:
        fp32 tensor: a scalar, or per-row losses for ``"none"``. No selected rows gives 0.
    """
    teacher_logits = _check_logits(student_logits, teacher_logits)
    temperature = check_positive_finite("temperature", temperature)
    mask = check_row_mask("mask", mask, student_logits.shape[:-1], student_logits.device)
    if reduction not in _KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_KL_REDUCTIONS}, got {reduction!r}")
    count = row_count(mask, student_logits.shape[:-1]) if reduction == "batchmean" else 1
    coef = _coef(1.0, count, 0.0, 1, student_logits.device)
    kl_rows, _, _ = torch.ops.distil.kl_ce_rows(
        student_logits, teacher_logits, None, mask, coef, temperature, -100, needs_grad(student_logits)
    )
    if reduction == "none":
        return kl_rows
    return kl_rows.sum() / divisor(count)


def kl_ce_loss(student_logits, teacher_logits, labels, *, temperature=2.0, kl_mask=None, ignore_index=-100,
               kl_weight=1.0, ce_weight=1.0):
    """The distillation KL and the masked-LM cross-entropy in one kernel launch over the student logits.

    Returns ``(kl, ce)`` with
    ``kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1)) * T**2``
    over the ``kl_mask`` rows (all rows by default; distiller.py's ``loss_ce``) and
    ``ce = nn.CrossEntropyLoss(ignore_index=ignore_index)(s, labels)`` at temperature 1 (its ``loss_mlm``).

    ``kl_weight`` and ``ce_weight`` do not change the values: they name the combination
    ``kl_weight * kl + ce_weight * ce`` that you will backpropagate, for which the gradient is written
    during the forward (backward then costs nothing). Any other combination is still exact; its
    backward scales or recomputes the gradient rows. DistilBERT's recipe is ``kl_weight=5.0, ce_weight=2.0``.

    Args:
        student_logits, teacher_logits: ``[N, V]`` or ``[B, S, V]`` float32/bfloat16/float16.
        labels: int64/int32 ``[N]`` / ``[B, S]``, in ``[0, V)`` or ``ignore_index``.
        temperature: T > 0 for the KL; the cross-entropy uses T = 1.
        kl_mask: optional bool ``[N]`` / ``[B, S]`` selecting the KL rows (``--restrict_ce_to_mask``
            in distiller.py is ``kl_mask = labels != -100``).
    Returns:
        ``(kl, ce)``: fp32 scalars; each is exactly 0 when it has no rows.
    """
    teacher_logits = _check_logits(student_logits, teacher_logits)
    temperature = check_positive_finite("temperature", temperature)
    kl_mask = check_row_mask("kl_mask", kl_mask, student_logits.shape[:-1], student_logits.device)
    labels, labelled = _check_labels(labels, student_logits, ignore_index)
    kl_weight = check_non_negative_finite("kl_weight", kl_weight)
    ce_weight = check_non_negative_finite("ce_weight", ce_weight)
    kl_count = row_count(kl_mask, student_logits.shape[:-1])
    ce_count = labelled.sum()
    coef = _coef(kl_weight, kl_count, ce_weight, ce_count, student_logits.device)
    kl_rows, ce_rows, _ = torch.ops.distil.kl_ce_rows(
        student_logits, teacher_logits, labels, kl_mask, coef, temperature, ignore_index,
        needs_grad(student_logits),
    )
    return kl_rows.sum() / divisor(kl_count), ce_rows.sum() / divisor(ce_count)


# One op = one module; they are re-exported here. distillation_loss imports this module, so it comes last.
from distil._cosine_op import cosine_loss  # noqa: E402
from distil._ops.linear_kl_ce import LinearKLCELoss, linear_kl_ce_loss  # noqa: E402
from distil.distillation_loss import DistillationLoss, DistillationLossOutput  # noqa: E402
