"""The paper's loss, eagerly: a restatement of ``Distiller.step`` (MLM mode) of Hugging Face's
``examples/research_projects/distillation/distiller.py``, written from its definition
(shared/REFERENCE.md). It is what the fused losses are tested and benchmarked against; it is not
fast: it builds full-size expanded masks and ``masked_select`` copies, as distiller.py does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def _select_rows(x, row_mask):
    """distiller.py's row selection: masked_select on the mask expanded to x's shape (a copy)."""
    return x.masked_select(row_mask.unsqueeze(-1).expand_as(x)).view(-1, x.shape[-1])


def distiller_loss(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, *,
                   alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, restrict_kl_to_mask=False):
    """``(total, kl, mlm, cos)`` as ``Distiller.step`` computes them, in the inputs' dtype:

    - ``kl`` (its ``loss_ce``): ``nn.KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2``
      over the non-pad rows (``attention_mask``), or the masked rows (``labels > -1``) with
      ``restrict_kl_to_mask`` (its ``--restrict_ce_to_mask``);
    - ``mlm``: ``nn.CrossEntropyLoss(ignore_index=-100)`` over all rows of the full logits;
    - ``cos``: ``nn.CosineEmbeddingLoss(reduction="mean")`` with target +1 over the non-pad rows of the
      last hidden states (skipped, 0, when ``alpha_cos == 0``);
    - ``total = alpha_kl·kl + alpha_mlm·mlm + alpha_cos·cos`` (before distiller's division by the
      gradient-accumulation steps).

    Logits ``[B, S, V]`` or ``[N, V]``; labels, attention_mask (bool, None = no padding) over the row
    dims; the hidden states may be None when ``alpha_cos == 0``.
    """
    vocab = student_logits.shape[-1]
    if attention_mask is None:  # no padding: every row is a real token
        attention_mask = labels.new_ones(labels.shape, dtype=torch.bool)
    kl_rows = (labels > -1) if restrict_kl_to_mask else attention_mask
    s_sel, t_sel = _select_rows(student_logits, kl_rows), _select_rows(teacher_logits, kl_rows)
    kl = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1)
    ) * temperature**2
    mlm = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(student_logits.reshape(-1, vocab), labels.reshape(-1))
    if alpha_cos == 0:
        cos = kl.new_zeros(())
    else:
        s_h, t_h = _select_rows(student_hidden, attention_mask), _select_rows(teacher_hidden, attention_mask)
        cos = nn.CosineEmbeddingLoss(reduction="mean")(s_h, t_h, s_h.new_ones(s_h.shape[0]))
    return alpha_kl * kl + alpha_mlm * mlm + alpha_cos * cos, kl, mlm, cos


def linear_distiller_losses(student_hidden, student_weight, student_bias, teacher_logits, labels, kl_mask, *,
                            temperature=2.0):
    """``(kl, mlm)`` of :func:`distiller_loss` on the student head's logits ``F.linear(student_hidden,
    student_weight, student_bias)`` (what ``linear_kl_ce_loss`` fuses): the KL over the ``kl_mask`` rows
    (None = all), the cross-entropy over the labelled rows."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    _, kl, mlm, _ = distiller_loss(student_logits, teacher_logits, labels, None, None, kl_mask, alpha_cos=0.0,
                                   temperature=temperature)
    return kl, mlm
