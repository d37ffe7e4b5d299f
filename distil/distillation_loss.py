"""DistilBERT's triple loss as one module (re-exported by :mod:`distil.fused_loss`)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distil._ops.common import (
    check_float_rows,
    check_labels,
    check_row_mask,
    check_tensor,
    check_weight,
)
from distil._ops.cosine import check_hidden, cosine_core
from distil._ops.divergence import JSD_BETA, SKEW_ALPHA, check_divergence
from distil._ops.kl_ce import check_teacher_logits, kl_ce_core, kl_div_core
from distil._ops.linear_kl_ce import LinearKLCELoss
from distil._ops.topk_kl_ce import TopKLogits, check_topk_teacher, topk_kl_ce_core
from distil.checks import check_non_negative_finite, check_temperature

IGNORE_INDEX = -100  # distiller.py's "not masked" label


class DistillationLossOutput(NamedTuple):
    """``total = kl_weight·kl + ce_weight·ce + cos_weight·cos``; the parts are unweighted (for logging),
    fp32 scalars, exactly 0 for a part whose weight is 0 or that has no rows."""

    total: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    cos: torch.Tensor


class DistillationLoss(nn.Module):
    """The loss of distiller.py's ``Distiller.step`` (MLM mode) from fused kernels.

    Equals ``alpha_ce·loss_ce + alpha_mlm·loss_mlm + alpha_cos·loss_cos`` there (before its division by
    the gradient-accumulation steps), with

    - ``kl`` (its ``loss_ce``): ``nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s/T), F.softmax(t/T)) * T**2``
      over every non-pad token, or only the masked ones (``labels != -100``, its ``labels > -1``, with or
      without the attention mask, as there) with ``restrict_kl_to_mask=True`` (its ``--restrict_ce_to_mask``);
    - ``ce``: ``nn.CrossEntropyLoss(ignore_index=-100)(s.view(-1, V), labels.view(-1))``;
    - ``cos``: ``nn.CosineEmbeddingLoss(reduction="mean")`` with target +1 between the student's and
      the teacher's last hidden states over the non-pad tokens.

    With ``student_head`` (and ``teacher_head``), the output projections (``nn.Linear``, e.g.
    ``model.get_output_embeddings()``), the module takes the rows *before* the projection
    (``student_head_input`` / ``teacher_head_input``, after each head's transform; see
    :class:`~distil.fused_loss.LinearKLCELoss` for where that is in BERT, DistilBERT, RoBERTa and LLaMA)
    instead of logits, and runs :func:`~distil.fused_loss.linear_kl_ce_loss`: the ``[rows, V]`` logits
    never exist. The teacher may instead give ``teacher_logits``, or a :class:`~distil.fused_loss.TopKLogits`
    (the teacher cache's: the student's fused head against a cached teacher). The heads' logit transforms
    (``logit_scale``, ``logit_softcap`` and the teacher's: Cohere's scale, Gemma 2/3's
    ``final_logit_softcapping``) are applied inside the fused head, as ``linear_kl_ce_loss`` documents.

    The rows are selected in the kernels (no ``masked_select`` copies), and each part's gradient is
    prepared in the forward for exactly ``total.backward()``, or for ``(total * grad_scale).backward()``
    when ``forward`` is given ``grad_scale`` (a loss scale and/or 1/grad_accum, as a number or a 0-d device
    tensor such as ``scaler.scale(torch.ones((), device=...))``: no host sync).  A zero weight skips its part entirely:
    ``kl_weight=0`` never reads the teacher's logits (pass ``None``), ``cos_weight=0`` never reads the
    hidden states.  Unlike PyTorch, a part with no rows is 0 (not NaN).  The defaults are the
    DistilBERT README recipe (``--alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0``, temperature 2): ``kl_weight`` is
    distiller.py's ``alpha_ce``, ``ce_weight`` its ``alpha_mlm`` (``alpha_clm`` for causal LMs), ``cos_weight``
    its ``alpha_cos``.

    ``divergence`` (with ``jsd_beta`` / ``skew_alpha``) replaces the forward KL of the ``kl`` part by another
    divergence (reverse KL, TRL's generalised JSD, the skew KLs, TVD), as in :func:`~distil.fused_loss.kl_ce_loss`,
    on every path (logits, heads, a top-k teacher: on the buckets of :func:`~distil.fused_loss.topk_kl_ce_loss`).
    """

    def __init__(self, kl_weight=5.0, ce_weight=2.0, cos_weight=1.0, temperature=2.0, restrict_kl_to_mask=False,
                 student_head=None, teacher_head=None, chunk_rows=None, *, logit_scale=1.0, logit_softcap=None,
                 teacher_logit_scale=1.0, teacher_logit_softcap=None, divergence="forward_kl", jsd_beta=JSD_BETA,
                 skew_alpha=SKEW_ALPHA):
        super().__init__()
        # The scalars are checked once, here; forward hands them to the ops' checked cores.
        self.op_divergence = check_divergence(divergence, jsd_beta, skew_alpha)  # (divergence, divergence_param)
        self.divergence_args = dict(divergence=divergence, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
        self.kl_weight = check_non_negative_finite("kl_weight", kl_weight)
        self.ce_weight = check_non_negative_finite("ce_weight", ce_weight)
        self.cos_weight = check_non_negative_finite("cos_weight", cos_weight)
        if self.kl_weight == self.ce_weight == self.cos_weight == 0.0:
            raise ValueError("at least one of kl_weight, ce_weight, cos_weight must be > 0")
        self.temperature = check_temperature("temperature", temperature)
        if not isinstance(restrict_kl_to_mask, bool):
            raise TypeError(f"restrict_kl_to_mask must be a bool, got {type(restrict_kl_to_mask).__name__}")
        self.restrict_kl_to_mask = restrict_kl_to_mask
        if student_head is None and teacher_head is not None:
            raise ValueError("teacher_head needs a student_head")
        transformed = (logit_scale != 1.0 or logit_softcap is not None or teacher_logit_scale != 1.0
                       or teacher_logit_softcap is not None)
        if student_head is None and transformed:
            raise ValueError("logit_scale / logit_softcap (and the teacher's) transform the fused heads' logits: "
                             "they need a student_head (logits passed in are already transformed)")
        # The heads' loss is a submodule, so FSDP2 can shard it (its forward gathers the heads).
        self.head_loss = None if student_head is None else LinearKLCELoss(
            student_head, teacher_head, temperature=self.temperature, ignore_index=IGNORE_INDEX,
            kl_weight=self.kl_weight, ce_weight=self.ce_weight, chunk_rows=chunk_rows, logit_scale=logit_scale,
            logit_softcap=logit_softcap, teacher_logit_scale=teacher_logit_scale,
            teacher_logit_softcap=teacher_logit_softcap, **self.divergence_args)

    def extra_repr(self):
        return (f"kl_weight={self.kl_weight}, ce_weight={self.ce_weight}, cos_weight={self.cos_weight}, "
                f"temperature={self.temperature}, restrict_kl_to_mask={self.restrict_kl_to_mask}, "
                f"divergence={self.divergence_args['divergence']!r}")

    def forward(self, student_logits=None, teacher_logits=None, labels=None, student_hidden=None,
                teacher_hidden=None, attention_mask=None, *, student_head_input=None, teacher_head_input=None,
                grad_scale=None):
        """Args:
            student_logits, teacher_logits: ``[B, S, V]``, or ``[M, V]`` rows already gathered. With heads,
                ``student_logits`` is None and ``teacher_logits`` optional (instead of ``teacher_head_input``).
                The teacher may be a :class:`distil.fused_loss.TopKLogits` (its top-k logits, e.g. from a
                teacher cache): the KL is then :func:`distil.fused_loss.topk_kl_ce_loss`'s (with heads, on
                the student's fused head).
            labels: int64/int32 ``[B, S]`` / ``[M]``, the masked-LM targets, -100 where not masked.
            student_hidden, teacher_hidden: last hidden states ``[B, S, H]`` / ``[M, H]`` (equal H). Rows
                gathered beforehand may be a different set than the logits' rows (``[M', H]``).
            attention_mask: bool or integer ``[B, S]`` / ``[M]``, nonzero at real (non-pad) tokens (Hugging
                Face's int64 0/1 mask as it is); ``None`` means every row is a real token (the usual case
                for pre-gathered rows).
            grad_scale: the factor ``total`` will be multiplied by before ``backward()`` (``None``: 1), a
                number or a 0-d float tensor on the logits' device; it does not change the values.
            student_head_input, teacher_head_input: with heads, the rows each projection multiplies
                (``[B, S, Hs]`` / ``[M, Hs]`` and ``[.., Ht]``; Hs and Ht may differ).
        Returns:
            :class:`DistillationLossOutput` ``(total, kl, ce, cos)``.
        """
        # Each tensor is checked once per call, here or (the heads' inputs) in the head loss's forward;
        # the ops' checked cores then take the values as they are.
        if self.head_loss is None:
            lead_name, lead = "student_logits", student_logits
            if student_head_input is not None or teacher_head_input is not None:
                raise ValueError("student_head_input / teacher_head_input need DistillationLoss(student_head=...)")
            check_float_rows(lead_name, lead)
        else:
            lead_name, lead = "student_head_input", student_head_input
            if student_logits is not None:
                raise ValueError("this DistillationLoss projects with its heads: pass student_head_input, "
                                 "not student_logits")
            check_tensor(lead_name, lead, ndims=(2, 3))
        rows = tuple(lead.shape[:-1])
        device = lead.device
        if labels is None:
            raise ValueError("labels is required")
        # The CE targets: checked in full here on the logits path (the head loss checks its own).
        ce_here = self.ce_weight > 0 and self.head_loss is None
        labelled = None
        if ce_here:
            labels, labelled = check_labels(labels, rows, lead.shape[-1], device, IGNORE_INDEX)
        else:
            check_tensor("labels", labels)
            if tuple(labels.shape) != rows:
                raise ValueError(f"labels must have shape {rows} (the {lead_name} row dims), got "
                                 f"{tuple(labels.shape)}")
        attention_mask = check_row_mask("attention_mask", attention_mask, rows, device)
        if grad_scale is None:
            kl_grad_weight, ce_grad_weight, cos_grad_weight = self.kl_weight, self.ce_weight, self.cos_weight
        else:
            # Formed as autograd forms each part's upstream gradient of total * grad_scale (fp32).
            grad_scale = check_weight("grad_scale", grad_scale, device)
            if not isinstance(grad_scale, torch.Tensor):
                grad_scale = torch.full((), grad_scale, dtype=torch.float32, device=device)
            kl_grad_weight, ce_grad_weight, cos_grad_weight = (
                grad_scale * w for w in (self.kl_weight, self.ce_weight, self.cos_weight))
        # distiller.py's restricted rows are labels > -1 alone (= labels != -100 once labels are valid).
        kl_mask = labels != IGNORE_INDEX if self.restrict_kl_to_mask else attention_mask
        topk = isinstance(teacher_logits, TopKLogits)
        if topk and teacher_logits.lse is not None and teacher_logits.temperature is None:
            raise ValueError("teacher_logits: a TopKLogits with an lse needs the temperature it was taken "
                             f"at (TopKLogits(..., temperature=T)); this loss uses T = {self.temperature}")
        logits_kl = self.head_loss is None and self.kl_weight > 0
        if logits_kl and teacher_logits is None:
            raise ValueError("teacher_logits is required when kl_weight > 0")
        if logits_kl and topk:
            teacher = check_topk_teacher(rows, device, *teacher_logits, self.temperature, kl_mask)
        elif logits_kl:
            teacher = check_teacher_logits(teacher_logits, student_logits)
        if self.cos_weight > 0:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("student_hidden and teacher_hidden are required when cos_weight > 0")
            # Pre-gathered rows ([M, .], no attention_mask) may gather the hidden states with another mask
            # than the logits (e.g. masked-only KL rows, non-pad cosine rows): then only the two hidden
            # tensors must agree, which check_hidden checks.
            if attention_mask is not None or lead.dim() != 2:
                for name, t in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
                    if isinstance(t, torch.Tensor) and tuple(t.shape[:-1]) != rows:
                        raise ValueError(f"{name} must have the row dims {rows} of {lead_name}, got shape "
                                         f"{tuple(t.shape)}")
            teacher_hidden = check_hidden(student_hidden, teacher_hidden)

        zero = torch.zeros((), dtype=torch.float32, device=device)
        kl = ce = cos = zero
        divergence, divergence_param = self.op_divergence
        if self.head_loss is not None and (self.kl_weight > 0 or self.ce_weight > 0):
            if self.kl_weight > 0 and teacher_logits is None and teacher_head_input is None:
                raise ValueError("teacher_head_input (or teacher_logits) is required when kl_weight > 0")
            use_kl = self.kl_weight > 0
            teacher_args = {}
            if use_kl and topk:
                teacher_args = dict(teacher_topk_logits=teacher_logits.logits, teacher_topk_index=teacher_logits.index,
                                    teacher_lse=teacher_logits.lse, teacher_lse_temperature=teacher_logits.temperature)
            elif use_kl:
                teacher_args = dict(teacher_head_input=teacher_head_input, teacher_logits=teacher_logits)
            # Without grad_scale the head loss uses its own weights (this module's, checked at construction).
            weights = {} if grad_scale is None else dict(kl_weight=kl_grad_weight, ce_weight=ce_grad_weight)
            kl, ce = self.head_loss(student_head_input, labels if self.ce_weight > 0 else None, kl_mask=kl_mask,
                                     **weights, **teacher_args)
        elif logits_kl and topk:
            # Without the CE part no row has a label, so it costs nothing.
            kl, ce = topk_kl_ce_core(student_logits, teacher, labels if ce_here else None, labelled, kl_mask,
                                     self.temperature, IGNORE_INDEX, kl_grad_weight, ce_grad_weight, divergence,
                                     divergence_param)
        elif logits_kl and ce_here:
            kl, ce = kl_ce_core(student_logits, teacher, labels, labelled, kl_mask, self.temperature, IGNORE_INDEX,
                                kl_grad_weight, ce_grad_weight, divergence, divergence_param)
        elif logits_kl:
            kl = kl_div_core(student_logits, teacher, kl_mask, self.temperature, "batchmean", kl_grad_weight,
                             divergence, divergence_param)
        elif ce_here:
            ce = _masked_lm_loss(student_logits, labels, labelled)
        if self.cos_weight > 0:
            cos = cosine_core(student_hidden, teacher_hidden, attention_mask, cos_grad_weight)
        total = self.kl_weight * kl + self.ce_weight * ce + self.cos_weight * cos
        return DistillationLossOutput(total, kl, ce, cos)


def _masked_lm_loss(student_logits, labels, labelled):
    """``F.cross_entropy(ignore_index=-100)`` in fp32, 0 (not NaN) when no token is masked; ``(labels,
    labelled)`` as :func:`~distil._ops.common.check_labels` returns them (the fused path's check)."""
    total = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / labelled.sum().clamp(min=1)
