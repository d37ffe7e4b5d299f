"""``distil::topk_kl_ce_rows``: its registration (the Triton kernel for CUDA, a fake impl for tracing,
autograd) and the public :func:`topk_kl_ce_loss` (re-exported by :mod:`distil.fused_loss`). Schema and
CPU kernel: csrc/topk_kl_ce.cpp; Triton kernel and the contract: kernels/topk_kl_ce.py.
"""
from typing import NamedTuple, Optional

import torch

from distil._ops.common import (
    FLOAT_DTYPES,
    check_kl_ce_args,
    check_tensor,
    check_unit_last_stride,
    divisor,
    kl_ce_coef,
    needs_grad,
)
from distil._ops.registry import register_gradient_op, triton_kernels
from distil.checks import JSD_BETA, SKEW_ALPHA, check_temperature

INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


class TopKLogits(NamedTuple):
    """A teacher's logits known by their top k (e.g. from :mod:`distil.teacher_cache`): ``logits`` and
    their vocabulary ``index`` ``[..., k]``, and ``lse`` (the full-vocabulary ``logsumexp(t / T)``) for
    the exact mode or ``None`` for the renormalised one, with the ``temperature`` T it was taken at
    (required with ``lse``: the loss refuses another T, since an lse cannot be carried from one T to
    another without the full logits). :class:`distil.fused_loss.DistillationLoss` takes it in place of
    the teacher's full logits and then uses :func:`topk_kl_ce_loss`."""

    logits: torch.Tensor
    index: torch.Tensor
    lse: Optional[torch.Tensor] = None
    temperature: Optional[float] = None


def _check_op_args(student, values, index, lse, labels, kl_mask, coef, *_scalars):
    """What the Triton kernel assumes, for direct calls of the op (the public function validates more)."""
    op = "topk_kl_ce_rows"
    if student.dim() not in (2, 3) or values.dim() != student.dim() or values.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{op}: student {tuple(student.shape)} and teacher_values {tuple(values.shape)} must be "
                         "[N, V] / [N, k] or [B, S, V] / [B, S, k]")
    if index.shape != values.shape or index.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: teacher_index must be int16/int32/int64 of shape {tuple(values.shape)}")
    for name, x in (("student", student), ("teacher_values", values), ("teacher_index", index)):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous along its last dim, got strides {x.stride()}")
    rows = student.shape[:-1]
    for name, x, dtype in (("teacher_lse", lse, torch.float32), ("labels", labels, torch.int64),
                           ("kl_mask", kl_mask, torch.bool)):
        if x is not None and (x.shape != rows or x.dtype != dtype):
            raise ValueError(f"{op}: {name} must be {dtype} of shape {tuple(rows)}")
    if coef.shape != (2,) or coef.dtype != torch.float32:
        raise ValueError(f"{op}: coef must be a float32 tensor of shape [2]")


register_gradient_op("topk_kl_ce_rows", 2, _check_op_args, triton_kernels("topk_kl_ce"))


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def check_topk_teacher(rows, device, values, index, lse, lse_temperature, temperature, kl_mask):
    """The top-k teacher of a loss over ``rows`` (the row dims) on ``device``, checked for
    :func:`topk_kl_ce_loss` and :func:`distil.fused_loss.linear_kl_ce_loss` (``temperature`` and the
    bool ``kl_mask`` already checked). Returns ``(values, index, lse, poison)``: the values detached,
    the lse as fp32 (or None), and :func:`_refuse_impossible_lse`'s per-row term (or None)."""
    rows = tuple(rows)
    check_tensor("teacher_topk_logits", values, dtypes=FLOAT_DTYPES, ndims=(len(rows) + 1,))
    if tuple(values.shape[:-1]) != rows or values.shape[-1] < 1:
        raise ValueError(f"teacher_topk_logits must have shape {rows + ('k',)} with k >= 1 (the student's rows), "
                         f"got {tuple(values.shape)}")
    check_tensor("teacher_topk_index", index, dtypes=INDEX_DTYPES)
    if index.shape != values.shape:
        raise ValueError(f"teacher_topk_index has shape {tuple(index.shape)} but teacher_topk_logits has "
                         f"shape {tuple(values.shape)}")
    check_unit_last_stride("teacher_topk_logits", values)
    check_unit_last_stride("teacher_topk_index", index)
    if lse is not None:
        check_tensor("teacher_lse", lse, dtypes=FLOAT_DTYPES)
        if tuple(lse.shape) != rows:
            raise ValueError(f"teacher_lse must have shape {rows} (the student's rows), got {tuple(lse.shape)}")
        lse = lse.detach().float()
    for name, t in (("teacher_topk_logits", values), ("teacher_topk_index", index), ("teacher_lse", lse)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the student's rows are on {device}")
    _check_lse_temperature(lse_temperature, temperature)
    values = values.detach()
    poison = None if lse is None else _refuse_impossible_lse(values, lse, temperature, kl_mask)
    return values, index, lse, poison


def _check_lse_temperature(lse_temperature, temperature):
    """``teacher_lse``'s temperature must be the loss's: logsumexp(t / T) at one T does not give it at
    another without the full logits (it is not a rescaling), so a mismatch is refused, not converted."""
    if lse_temperature is None:
        return
    if check_temperature("teacher_lse_temperature", lse_temperature) != temperature:
        raise ValueError(f"teacher_lse was taken at T = {lse_temperature} but temperature is {temperature}: "
                         "an lse cannot be moved to another temperature without the teacher's full logits")


def _impossible_lse_rows(values, lse, temperature, kl_mask):
    """KL rows whose ``lse`` is below the log-sum-exp of their own top-k logits at T, i.e. a top-k mass
    Q > 1 (an lse of another temperature, teacher or row order). Slack: the values' rounding (one eps
    of their dtype times the largest |t / T|) and the kernels' tail floor 2^-16."""
    scaled = values.float() / temperature
    largest = torch.where(scaled.isfinite(), scaled.abs(), 0.0).amax(-1)
    bad = torch.logsumexp(scaled, -1) > lse + torch.finfo(values.dtype).eps * largest + 2.0**-16
    return bad if kl_mask is None else bad & kl_mask


def _refuse_impossible_lse(values, lse, temperature, kl_mask):
    """On CPU a ValueError naming the first impossible row (None when there is none); on CUDA (and under
    torch.compile), where that would need a host sync, the per-row term to add to the KL rows: NaN at
    the impossible rows, 0 elsewhere."""
    bad = _impossible_lse_rows(values, lse, temperature, kl_mask)
    if lse.is_cuda or torch.compiler.is_compiling():
        return torch.where(bad, float("nan"), 0.0)
    if bool(bad.any()):
        row = tuple(int(i) for i in bad.nonzero()[0])
        mass = torch.exp(torch.logsumexp(values[row].float() / temperature, -1) - lse[row]).item()
        raise ValueError(f"teacher_lse at row {row[0] if len(row) == 1 else row} is below the log-sum-exp of "
                         f"that row's top-k logits at T = {temperature} (top-k mass {mass:.4g} > 1): an lse of "
                         "another temperature, teacher or row order")
    return None


def topk_kl_ce_loss(student_logits, teacher_topk_logits, teacher_topk_index, labels, *, teacher_lse=None,
                    teacher_lse_temperature=None, temperature=2.0, kl_mask=None, ignore_index=-100, kl_weight=1.0,
                    ce_weight=1.0, divergence="forward_kl", jsd_beta=JSD_BETA, skew_alpha=SKEW_ALPHA):
    """:func:`kl_ce_loss` against a teacher known by its top-k logits (e.g. from an offline cache,
    :mod:`distil.teacher_cache`), in one kernel launch over the student logits.

    Returns ``(kl, ce)``: ``kl`` is ``T² · KL`` averaged over the ``kl_mask`` rows (batchmean) and
    ``ce = nn.CrossEntropyLoss(ignore_index=ignore_index)(s, labels)``, as :func:`kl_ce_loss`. The
    teacher distribution (formulas and gradients: kernels/topk_kl_ce.py):

    - ``teacher_lse=None`` (renormalised, the TRL / DistillKit convention): ``q = softmax(t_k / T)`` over
      the k entries, against the student's full-vocabulary ``log_softmax(s / T)`` at those indices:
      ``Σ_k q (log q − log p)``;
    - ``teacher_lse`` given (exact): one tail bucket with the teacher's mass outside the k tokens,
      ``q_tail = 1 − exp(logsumexp(t_k / T) − lse)``, and its top-k probabilities ``(1 − q_tail) ·
      softmax(t_k / T)``, against the student's ``1 − Σ_k p`` and ``p``: the KL over the k tokens and
      the tail, which equals the dense ``kl_ce_loss`` KL when k = V. A teacher tail below
      ``max(2^-16, |lse| · 2^-21)`` is rounding noise of the fp32 ``lse`` and is 0 (the renormalised
      mode); a student tail below 2^-16 is floored there.

    The gradient is written during the forward for ``kl_weight * kl + ce_weight * ce`` (see
    :func:`kl_ce_loss`); the teacher gets no gradient.

    Args:
        student_logits: ``[N, V]`` or ``[B, S, V]`` float32/bfloat16/float16, contiguous along V.
        teacher_topk_logits: ``[N, k]`` / ``[B, S, k]`` raw teacher logits (not divided by T), any float dtype.
        teacher_topk_index: their vocabulary indices, int16/int32/int64, same shape. Each must be in
            ``[0, V)`` and appear once per row: the CPU kernel raises otherwise; the CUDA kernel does
            not check (an out-of-range index is skipped, a repeated one gives an undefined gradient at
            that token). Rows outside ``kl_mask`` never read theirs.
        labels: int64/int32 ``[N]`` / ``[B, S]``, in ``[0, V)`` or ``ignore_index``.
        teacher_lse: optional ``[N]`` / ``[B, S]`` ``logsumexp(t / T)`` of the teacher's full vocabulary
            at this ``temperature`` (natural log; used in fp32). It can be no smaller than the
            log-sum-exp of the row's own top-k logits (a top-k mass above 1 is impossible: an lse of
            another temperature or teacher): a ``ValueError`` on CPU; on CUDA (and under torch.compile),
            where raising would need a host sync, ``kl`` is NaN instead (the gradient is left as the
            kernel wrote it; the trainer stops on the NaN loss).
        teacher_lse_temperature: the T ``teacher_lse`` was taken at; when given it must equal
            ``temperature`` (an lse cannot be moved to another T without the full logits).
            :class:`TopKLogits` carries it for you.
        temperature: T > 0 for the KL; the cross-entropy uses T = 1.
        kl_mask: optional bool ``[N]`` / ``[B, S]`` selecting the KL rows (default: all rows).
        divergence: ``"forward_kl"`` (default), ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``,
            ``"skew_reverse_kl"`` or ``"tvd"`` (:mod:`distil._ops.divergence`, as :func:`kl_ce_loss`), on the
            buckets of the teacher's mode: the k tokens (teacher q, student p at the indices) and, with
            ``teacher_lse``, the tail bucket (the teacher's tail mass against the student's ``1 − Σ_k p``):
            with k = V the dense divergence. In the renormalised mode the student's side sums to below 1,
            so the reverse KLs can be negative there.
        jsd_beta, skew_alpha: as :func:`kl_ce_loss`.
    Returns:
        ``(kl, ce)``: fp32 scalars; each is exactly 0 when it has no rows.
    """
    (divergence, divergence_param, temperature, ignore_index, kl_mask, labels, labelled, kl_weight,
     ce_weight) = check_kl_ce_args(student_logits, kl_mask, labels, kl_weight, ce_weight, temperature, ignore_index,
                                   divergence, jsd_beta, skew_alpha)
    teacher = check_topk_teacher(student_logits.shape[:-1], student_logits.device, teacher_topk_logits,
                                 teacher_topk_index, teacher_lse, teacher_lse_temperature, temperature, kl_mask)
    return topk_kl_ce_core(student_logits, teacher, labels, labelled, kl_mask, temperature, ignore_index, kl_weight,
                           ce_weight, divergence, divergence_param)


def topk_kl_ce_core(student_logits, teacher, labels, labelled, kl_mask, temperature, ignore_index, kl_weight,
                    ce_weight, divergence, divergence_param):
    """:func:`topk_kl_ce_loss` on checked arguments: ``teacher`` as :func:`check_topk_teacher` returns it,
    the rest as :func:`~distil._ops.kl_ce.kl_ce_core` takes them."""
    values, index, lse, poison = teacher
    coef, kl_count, ce_count = kl_ce_coef(kl_weight, kl_mask, ce_weight, labelled, student_logits.shape[:-1],
                                          student_logits.device)
    kl_rows, ce_rows, _ = torch.ops.distil.topk_kl_ce_rows(
        student_logits, values, index, lse, labels, kl_mask, coef, temperature, ignore_index,
        needs_grad(student_logits), divergence, divergence_param,
    )
    if poison is not None:  # a NaN loss, not a silently wrong one; the gradient passes through unchanged
        kl_rows = kl_rows + poison
    return kl_rows.sum() / divisor(kl_count), ce_rows.sum() / divisor(ce_count)
