"""The eager references of every op, in plain PyTorch: what the tests compare against (in float64)
and what the benchmarks time as "eager" (in the inputs' dtype). Not fast, by design.

- per-row references of the ops: :func:`kl_ce_rows`, :func:`topk_kl_ce_rows`, :func:`cosine_rows`,
  :func:`masked_gather`;
- distiller.py's losses (Hugging Face ``examples/research_projects/distillation/distiller.py``,
  ``Distiller.step`` in MLM mode, restated from its definition): :func:`distiller_kl`,
  :func:`distiller_mlm`, :func:`distiller_cos` and the weighted step :func:`distiller_loss`, with its
  row selection by ``masked_select`` on full-size expanded masks, and the same on LM heads' logits
  (:func:`head_logits`, with the models' logit scale and soft cap), :func:`linear_distiller_losses` (what
  ``linear_kl_ce_loss`` fuses);
- its causal branch (``--mlm`` off, DistilGPT2): :func:`distiller_causal_loss` and the step of two
  causal LMs, :func:`distiller_causal_step`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # distiller.py's "not masked" label


def kl_ce_rows(s, t, labels, kl_mask, temperature, ignore_index=IGNORE_INDEX, divergence="forward_kl",
               divergence_param=0.0):
    """Per-row ``(T²·KL, CE)`` of ``distil::kl_ce_rows``, differentiable w.r.t. ``s``.

    ``kl = T² · nn.KLDivLoss(reduction="none")(log_softmax(s/T), softmax(t/T)).sum(-1)`` with terms of
    q = 0 taken as 0 (xlogy: KLDivLoss gives NaN where the student is -inf there too), 0 where
    ``kl_mask`` is False; ``ce = F.cross_entropy(s, y, ignore_index, reduction="none")``; zeros without
    labels. -inf policy: a row -inf everywhere (in s, or in t for the KL) has loss 0 and gradient 0.
    Another ``divergence`` replaces the KL by T² times :func:`divergence_rows`.
    """
    s_dead, t_dead = s.isneginf().all(-1), t.isneginf().all(-1)
    # Dead rows become zeros so that autograd through them stays finite; they are zeroed below.
    s = torch.where(s_dead[..., None], torch.zeros_like(s), s)
    t = torch.where(t_dead[..., None], torch.zeros_like(t), t).to(s.dtype)
    if divergence == "forward_kl":
        log_p, q = F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1)
        kl = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q)).sum(-1) * temperature**2
    else:
        kl = divergence_rows(F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), divergence,
                             divergence_param) * temperature**2
    return _select_rows_and_ce(kl, s, s_dead, t_dead, labels, kl_mask, ignore_index)


def _kl_terms(log_a, log_b):
    """Σ a (log a − log b) per row from log-probabilities: terms with a = 0 are 0 (with a gradient of 0),
    +inf where b = 0 < a."""
    a_pos = log_a > float("-inf")
    log_a = torch.where(a_pos, log_a, torch.zeros_like(log_a))
    log_b = torch.where(a_pos, log_b, torch.zeros_like(log_b))
    return torch.where(a_pos, log_a.exp() * (log_a - log_b), torch.zeros_like(log_a)).sum(-1)


def _mixture_log(log_a, log_b, weight_a):
    """log(w a + (1 − w) b) for w in (0, 1), from log-probabilities (-inf where a = b = 0, with a gradient
    of 0 there)."""
    both_zero = (log_a == float("-inf")) & (log_b == float("-inf"))
    log_a = torch.where(both_zero, torch.zeros_like(log_a), log_a)
    log_b = torch.where(both_zero, torch.zeros_like(log_b), log_b)
    log_m = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1 - weight_a))
    return torch.where(both_zero, torch.full_like(log_m, float("-inf")), log_m)


def divergence_rows(log_p, log_q, divergence, divergence_param=0.0):
    """Per-row divergence of the student's distribution q from the teacher's p, from their
    log-probabilities (the kernels multiply it by T²), as defined (ARCHITECTURE.md, distil/_ops/divergence.py):

    - ``"forward_kl"``: KL(p‖q); ``"reverse_kl"``: KL(q‖p);
    - ``"jsd"``, β = ``divergence_param`` in (0, 1): β·KL(p‖m) + (1 − β)·KL(q‖m), m = β·p + (1 − β)·q;
    - ``"skew_kl"``, α in (0, 1): KL(p‖α·p + (1 − α)·q); ``"skew_reverse_kl"``: KL(q‖α·q + (1 − α)·p);
    - ``"tvd"``: ½·Σ|p − q|, whose gradient autograd takes with sign(0) = 0.

    Terms of probability 0 are 0; a divergence with a zero where its first argument is not is +inf.
    """
    if divergence == "forward_kl":
        return _kl_terms(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_terms(log_q, log_p)
    if divergence == "jsd":
        beta = divergence_param
        log_m = _mixture_log(log_p, log_q, beta)
        return beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)
    if divergence == "skew_kl":
        return _kl_terms(log_p, _mixture_log(log_p, log_q, divergence_param))
    if divergence == "skew_reverse_kl":
        return _kl_terms(log_q, _mixture_log(log_q, log_p, divergence_param))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def _select_rows_and_ce(kl, s, s_dead, t_dead, labels, kl_mask, ignore_index):
    """(kl zeroed outside kl_mask and at dead rows, the CE of s at labels: zeros without labels, 0 at
    rows whose student is -inf everywhere): the part both KL+CE references share."""
    kl_on = ~s_dead & ~t_dead
    if kl_mask is not None:
        kl_on = kl_on & kl_mask
    kl = torch.where(kl_on, kl, torch.zeros_like(kl))
    if labels is None:
        return kl, torch.zeros_like(kl)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                         reduction="none").reshape(kl.shape)
    return kl, torch.where(s_dead, torch.zeros_like(ce), ce)


TAIL_FLOOR = 2.0**-16  # kernels/topk_kl_ce.py: a tail mass is resolved above it
LSE_RESOLUTION = 2.0**-21  # kernels/topk_kl_ce.py: the teacher's tail is noise below |lse| times this


def _topk_buckets(s, values, index, lse, temperature):
    """What both top-k references start from: ``(s, s_dead, t_dead, log_p, log_q, q_tail)`` with rows -inf
    everywhere zeroed (flagged dead), the student's log-probabilities at ``index``, the teacher's over its k
    logits and, with ``lse``, its tail mass (0 below the fp32 lse's rounding; None without ``lse``)."""
    s_dead = s.isneginf().all(-1)
    t_dead = lse.isneginf() if lse is not None else values.isneginf().all(-1)
    s = torch.where(s_dead[..., None], torch.zeros_like(s), s)
    t = torch.where(t_dead[..., None], torch.zeros_like(values), values).to(s.dtype)
    log_p = F.log_softmax(s / temperature, -1).gather(-1, index.long())
    log_q = F.log_softmax(t / temperature, -1)
    q_tail = None
    if lse is not None:
        lse = torch.where(t_dead, torch.zeros_like(lse), lse).to(s.dtype)
        q_tail = -torch.expm1(torch.logsumexp(t / temperature, -1) - lse)
        q_tail = torch.where(q_tail <= (lse.abs() * LSE_RESOLUTION).clamp(min=TAIL_FLOOR), 0.0, q_tail)
    return s, s_dead, t_dead, log_p, log_q, q_tail


def topk_kl_ce_rows(s, values, index, lse, labels, kl_mask, temperature, ignore_index=IGNORE_INDEX):
    """Per-row ``(T²·KL, CE)`` of ``distil::topk_kl_ce_rows``, differentiable w.r.t. ``s``.

    With ``log p = log_softmax(s/T)`` over the vocabulary taken at ``index`` and ``r = softmax(values/T)``
    over the k entries: without ``lse``, ``q = r`` and ``kl = T² Σ_k q (log q − log p)``; with ``lse``, the
    teacher's tail mass ``q_t = 1 − exp(logsumexp(values/T) − lse)``, 0 where it is at most
    ``max(F, |lse| 2^-21)`` (the rounding of an fp32 lse), ``q = (1 − q_t) r`` and the tail bucket
    ``q_t log(q_t / p_t)`` is added, ``p_t = max(1 − Σp, F)``, F = ``TAIL_FLOOR``. Terms with q = 0 are 0;
    rows -inf everywhere (s; the k values, or lse) have loss 0 and gradient 0, as in :func:`kl_ce_rows`.
    """
    s, s_dead, t_dead, log_p, log_q, q_tail = _topk_buckets(s, values, index, lse, temperature)
    if lse is not None:
        log_q = log_q + torch.log1p(-q_tail)[..., None]
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    if lse is not None:
        p_tail = (1 - log_p.exp().sum(-1)).clamp(min=TAIL_FLOOR)
        kl = kl + torch.where(q_tail > 0, q_tail * (q_tail.log() - p_tail.log()), 0.0)
    return _select_rows_and_ce(kl * temperature**2, s, s_dead, t_dead, labels, kl_mask, ignore_index)


def topk_divergence_rows(s, values, index, lse, labels, kl_mask, temperature, divergence, divergence_param=0.0,
                         ignore_index=IGNORE_INDEX):
    """Per-row ``(T²·D, CE)`` of ``distil::topk_kl_ce_rows`` with ``divergence`` (:func:`divergence_rows`)
    on the buckets of :func:`topk_kl_ce_rows`: the k tokens (teacher ``q``, student ``p`` at ``index``) and,
    with ``lse``, the tail (the teacher's ``q_t`` against the student's ``1 − Σp``, 0 when k = V), unfloored.
    ``"forward_kl"`` is :func:`topk_kl_ce_rows` itself."""
    if divergence == "forward_kl":
        return topk_kl_ce_rows(s, values, index, lse, labels, kl_mask, temperature, ignore_index)
    s, s_dead, t_dead, log_p, log_q, q_tail = _topk_buckets(s, values, index, lse, temperature)
    if lse is not None:
        log_q = torch.cat([log_q + torch.log1p(-q_tail)[..., None], q_tail.log()[..., None]], -1)
        p_tail = (1 - log_p.exp().sum(-1)).clamp(min=0) if values.shape[-1] < s.shape[-1] else torch.zeros_like(q_tail)
        log_p = torch.cat([log_p, p_tail.log()[..., None]], -1)
    rows = divergence_rows(log_q, log_p, divergence, divergence_param)
    return _select_rows_and_ce(rows * temperature**2, s, s_dead, t_dead, labels, kl_mask, ignore_index)


def cosine_rows(x, y, mask=None):
    """Per-row ``1 − cos`` of ``distil::cosine_rows`` with ``nn.CosineEmbeddingLoss``'s (target +1)
    math, ``cos = Σxy / sqrt((Σx² + 1e-12)(Σy² + 1e-12))``; 0 where ``mask`` is False."""
    y = y.to(x.dtype)
    cos = (x * y).sum(-1) / ((x * x).sum(-1).add(1e-12) * (y * y).sum(-1).add(1e-12)).sqrt()
    loss = 1 - cos
    return loss if mask is None else torch.where(mask, loss, torch.zeros_like(loss))


def masked_gather(x, mask):
    """``distil::masked_gather`` in exact mode: ``(x[mask], flat indices, count)``."""
    return x[mask], mask.flatten().nonzero().squeeze(1), mask.sum()


def select_rows(x, row_mask):
    """distiller.py's row selection: masked_select on the mask expanded to x's shape (a copy)."""
    return x.masked_select(row_mask.unsqueeze(-1).expand_as(x)).view(-1, x.shape[-1])


def distiller_kl(s, t, temperature):
    """distiller.py's ``loss_ce`` on selected rows:
    ``nn.KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2``."""
    return nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1)
    ) * temperature**2


def distiller_mlm(s, labels):
    """distiller.py's ``loss_mlm``: ``nn.CrossEntropyLoss(ignore_index=-100)`` over all rows."""
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(s.reshape(-1, s.shape[-1]), labels.reshape(-1))


def distiller_cos(s, t):
    """distiller.py's ``loss_cos`` on selected rows: ``nn.CosineEmbeddingLoss(reduction="mean")``, target +1."""
    return nn.CosineEmbeddingLoss(reduction="mean")(s, t, s.new_ones(s.shape[0]))


def distiller_loss(student_logits, teacher_logits, labels, student_hidden, teacher_hidden, attention_mask, *,
                   alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, restrict_kl_to_mask=False):
    """``(total, kl, mlm, cos)`` as ``Distiller.step`` computes them, in the inputs' dtype:

    - ``kl`` (its ``loss_ce``, :func:`distiller_kl`) over the non-pad rows (``attention_mask``), or the
      masked rows (``labels > -1``) with ``restrict_kl_to_mask`` (its ``--restrict_ce_to_mask``);
    - ``mlm`` (:func:`distiller_mlm`) over all rows of the full logits;
    - ``cos`` (:func:`distiller_cos`) over the non-pad rows of the last hidden states (skipped, 0,
      when ``alpha_cos == 0``);
    - ``total = alpha_kl·kl + alpha_mlm·mlm + alpha_cos·cos`` (before distiller's division by the
      gradient-accumulation steps). ``alpha_kl`` is distiller.py's ``alpha_ce``.

    Logits ``[B, S, V]`` or ``[N, V]``; labels, attention_mask (bool, None = no padding) over the row
    dims; the hidden states may be None when ``alpha_cos == 0``.
    """
    if attention_mask is None:  # no padding: every row is a real token
        attention_mask = labels.new_ones(labels.shape, dtype=torch.bool)
    kl_rows = (labels > -1) if restrict_kl_to_mask else attention_mask
    kl = distiller_kl(select_rows(student_logits, kl_rows), select_rows(teacher_logits, kl_rows), temperature)
    mlm = distiller_mlm(student_logits, labels)
    if alpha_cos == 0:
        cos = kl.new_zeros(())
    else:
        cos = distiller_cos(select_rows(student_hidden, attention_mask), select_rows(teacher_hidden, attention_mask))
    return alpha_kl * kl + alpha_mlm * mlm + alpha_cos * cos, kl, mlm, cos


def head_logits(head_input, weight, bias, logit_scale=1.0, logit_softcap=None):
    """An LM head's logits with the models' transforms: ``F.linear(...) * logit_scale`` (Cohere's
    ``logit_scale``), then ``c * tanh(logits / c)`` for ``logit_softcap`` c (Gemma 2/3's
    ``final_logit_softcapping``, as ``Gemma2ForCausalLM.forward`` applies it)."""
    logits = F.linear(head_input, weight, bias) * logit_scale
    return logits if logit_softcap is None else logit_softcap * torch.tanh(logits / logit_softcap)


def linear_distiller_losses(student_head_input, student_weight, student_bias, teacher_logits, labels, kl_mask, *,
                            temperature=2.0, logit_scale=1.0, logit_softcap=None):
    """``(kl, mlm)`` of :func:`distiller_loss` on the student head's logits :func:`head_logits`
    (what ``linear_kl_ce_loss`` fuses): the KL over the ``kl_mask`` rows (None = all), the cross-entropy
    over the labelled rows."""
    student_logits = head_logits(student_head_input, student_weight, student_bias, logit_scale, logit_softcap)
    _, kl, mlm, _ = distiller_loss(student_logits, teacher_logits, labels, None, None, kl_mask, alpha_cos=0.0,
                                   temperature=temperature)
    return kl, mlm


def distiller_step(student, teacher, input_ids, attention_mask, labels, *, restrict_kl_to_mask, alpha_kl=5.0,
                   alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0):
    """``(total, kl, mlm, cos)`` of one ``Distiller.step`` (MLM mode) of Hugging Face masked-LM models: the
    teacher under no_grad, the student with grad, both with ``output_hidden_states``, then
    :func:`distiller_loss` on the full logits and the last hidden states."""
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return distiller_loss(s_out.logits, t_out.logits, labels, s_out.hidden_states[-1], t_out.hidden_states[-1],
                          attention_mask.bool(), alpha_kl=alpha_kl, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos,
                          temperature=temperature, restrict_kl_to_mask=restrict_kl_to_mask)


def distiller_causal_loss(student_logits, teacher_logits, input_ids, student_hidden, teacher_hidden, attention_mask, *,
                          alpha_kl=5.0, alpha_clm=2.0, alpha_cos=1.0, temperature=2.0):
    """``(total, kl, clm, cos)`` as ``Distiller.step`` computes them with ``--mlm`` off, in the inputs' dtype:

    - ``lm_labels``: ``input_ids`` with -100 at padding (its ``prepare_batch_clm``);
    - ``kl`` (its ``loss_ce``, :func:`distiller_kl`) over the ``attention_mask`` rows of the unshifted logits;
    - ``clm``: ``CrossEntropyLoss(ignore_index=-100)(s_logits[..., :-1, :], lm_labels[..., 1:])``;
    - ``cos`` (:func:`distiller_cos`) over the ``attention_mask`` rows of the last hidden states (0 when
      ``alpha_cos == 0``);
    - ``total = alpha_kl·kl + alpha_clm·clm + alpha_cos·cos``.

    Logits ``[B, S, V]``, ``input_ids`` and bool ``attention_mask`` ``[B, S]``."""
    lm_labels = input_ids.masked_fill(~attention_mask, IGNORE_INDEX)
    kl = distiller_kl(select_rows(student_logits, attention_mask), select_rows(teacher_logits, attention_mask),
                      temperature)
    clm = distiller_mlm(student_logits[..., :-1, :], lm_labels[..., 1:])
    if alpha_cos == 0:
        cos = kl.new_zeros(())
    else:
        cos = distiller_cos(select_rows(student_hidden, attention_mask), select_rows(teacher_hidden, attention_mask))
    return alpha_kl * kl + alpha_clm * clm + alpha_cos * cos, kl, clm, cos


def distiller_causal_step(student, teacher, input_ids, attention_mask, *, alpha_kl=5.0, alpha_clm=2.0, alpha_cos=1.0,
                          temperature=2.0, vocab_size=None):
    """``(total, kl, clm, cos)`` of one ``Distiller.step`` with ``--mlm`` off, for Hugging Face causal LMs:
    both models run on the ids without an attention mask, as distiller.py runs GPT-2 (causal attention
    never reads the right padding), then :func:`distiller_causal_loss` on the full logits (their first
    ``vocab_size`` columns, when given) and the last hidden states."""
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, output_hidden_states=True)
    s_out = student(input_ids=input_ids, output_hidden_states=True)
    columns = slice(None, vocab_size)
    return distiller_causal_loss(s_out.logits[..., columns], t_out.logits[..., columns], input_ids,
                                 s_out.hidden_states[-1], t_out.hidden_states[-1], attention_mask.bool(),
                                 alpha_kl=alpha_kl, alpha_clm=alpha_clm, alpha_cos=alpha_cos, temperature=temperature)
