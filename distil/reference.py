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


TAIL_FLOOR = 2.0**-16  # kernels/topk_kl_ce.py: both tail masses are floored here


def topk_kl_ce_rows(s, values, index, lse, labels, kl_mask, temperature, ignore_index=IGNORE_INDEX):
    """Per-row ``(T²·KL, CE)`` of ``distil::topk_kl_ce_rows``, differentiable w.r.t. ``s``.

    With ``log p = log_softmax(s/T)`` over the vocabulary taken at ``index``: without ``lse``,
    ``q = softmax(values/T)`` over the k entries and ``kl = T² Σ_k q (log q − log p)``; with ``lse``,
    ``q = exp(values/T − lse)`` and the tail bucket ``q_t log(q_t / p_t)`` is added, with
    ``q_t = max(1 − Σq, F)``, ``p_t = max(1 − Σp, F)``, F = ``TAIL_FLOOR``. Terms with q = 0 are 0;
    rows -inf everywhere (s; the k values, or lse) have loss 0 and gradient 0, as in :func:`kl_ce_rows`.
    """
    s_dead = s.isneginf().all(-1)
    t_dead = lse.isneginf() if lse is not None else values.isneginf().all(-1)
    s = torch.where(s_dead[..., None], torch.zeros_like(s), s)
    t = torch.where(t_dead[..., None], torch.zeros_like(values), values).to(s.dtype)
    log_p = F.log_softmax(s / temperature, -1).gather(-1, index.long())
    if lse is None:
        log_q = F.log_softmax(t / temperature, -1)
    else:
        log_q = t / temperature - torch.where(t_dead, torch.zeros_like(lse), lse).to(s.dtype)[..., None]
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    if lse is not None:
        q_tail = (1 - q.sum(-1)).clamp(min=TAIL_FLOOR)
        p_tail = (1 - log_p.exp().sum(-1)).clamp(min=TAIL_FLOOR)
        kl = kl + q_tail * (q_tail.log() - p_tail.log())
    kl = kl * temperature**2
    kl_on = ~s_dead & ~t_dead
    if kl_mask is not None:
        kl_on = kl_on & kl_mask
    kl = torch.where(kl_on, kl, torch.zeros_like(kl))
    if labels is None:
        return kl, torch.zeros_like(kl)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                         reduction="none").reshape(kl.shape)
    return kl, torch.where(s_dead, torch.zeros_like(ce), ce)
