"""The model side of one distillation step: bodies on the whole batch, LM heads on the loss rows only.

:class:`DistillationStep` is what ``distil-train`` runs per micro-batch and what
``benchmarks/bench_step.py`` measures against ``distiller.py``'s eager step. Masked LMs take the
masker's labels; causal LMs take :func:`causal_labels` (the next token on each row), and the same
step then computes distiller.py's causal branch.
"""
from typing import NamedTuple

import torch
from torch import nn

from distil._ops.topk_kl_ce import TopKLogits
from distil.distillation_loss import IGNORE_INDEX
from distil.ops import masked_gather
from distil.student import lm_adapter


def causal_labels(input_ids, attention_mask):
    """The next-token label of every row ``[B, S]``: ``input_ids[b, s + 1]`` where both ``s`` and
    ``s + 1`` are real tokens, -100 elsewhere (the last real token, padding, the end of a block).

    distiller.py's causal branch computes ``CrossEntropyLoss(ignore_index=-100)(s_logits[..., :-1, :],
    lm_labels[..., 1:])`` with ``lm_labels`` the input ids, -100 at padding (``prepare_batch_clm``):
    these labels put ``lm_labels[..., 1:]`` on the row whose logits predict it, so the loss's CE over
    the labelled rows is that loss on right-padded batches and packed blocks. (On a left-padded row
    distiller.py would also train the pad just before the first token to predict it; here it does not.)
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise TypeError(f"input_ids must be a [B, S] tensor, got "
                        f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    real = attention_mask.bool()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(real[:, :-1] & real[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return labels


def fused_heads(student_adapter, teacher_adapter=None):
    """:class:`DistillationLoss`'s fused-head arguments from the models' adapters: each output projection
    with its logit transform (:func:`distil.student.logit_transform`); no teacher head for a cached teacher,
    whose logits are final."""
    heads = dict(student_head=student_adapter.projection, logit_scale=student_adapter.logit_scale,
                 logit_softcap=student_adapter.logit_softcap)
    if teacher_adapter is not None:
        heads.update(teacher_head=teacher_adapter.projection, teacher_logit_scale=teacher_adapter.logit_scale,
                     teacher_logit_softcap=teacher_adapter.logit_softcap)
    return heads


def select_rows(adapter, input_ids, attention_mask, logit_mask, hidden_mask, project=True):
    """Body on the whole batch, LM head on the ``logit_mask`` rows only. Returns (logits [M, V] of the
    ``logit_mask`` rows, last hidden rows [M', H] of the ``hidden_mask`` rows); either mask may be None
    (that output is None, and no head runs without ``logit_mask``), and ``hidden_mask is logit_mask``
    reuses one gather. The eager equivalent is ``model(...).logits[logit_mask]`` and
    ``hidden_states[-1][hidden_mask]``. With ``project=False`` the first output is the head's transform
    of those rows (what the output projection multiplies), for the fused head loss (whose logit transforms
    then are the loss's: :func:`fused_heads`)."""
    hidden = adapter.body(input_ids, attention_mask)
    logit_rows = None if logit_mask is None else masked_gather(hidden, logit_mask)[0]
    if hidden_mask is None:
        hidden_rows = None
    elif hidden_mask is logit_mask:
        hidden_rows = logit_rows
    else:
        hidden_rows = masked_gather(hidden, hidden_mask)[0]
    if logit_rows is not None:
        logit_rows = adapter.head(logit_rows) if project else adapter.transform(logit_rows)
    return logit_rows, hidden_rows


class StudentRows(nn.Module):
    """The student's part of a step as one module, so that DDP wrapping it sees a forward call
    (the adapter calls the model's submodules directly, which would bypass DDP's hooks).
    ``vocab_size``: the head's first rows only (:func:`distil.student.lm_adapter`)."""

    def __init__(self, student, vocab_size=None):
        super().__init__()
        self.student = student
        self.adapter = lm_adapter(student, vocab_size)

    def forward(self, input_ids, attention_mask, logit_mask, hidden_mask, project=True):
        return select_rows(self.adapter, input_ids, attention_mask, logit_mask, hidden_mask, project)


class StepRows(NamedTuple):
    """The rows one step's loss reads: ``labels`` belong to the logit rows; a ``None`` is a part that
    the loss weights switch off (teacher logits without KL, hidden rows without cosine). With a fused-head
    loss the two "logits" are the rows each output projection multiplies."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor
    student_hidden: torch.Tensor | None
    teacher_hidden: torch.Tensor | None


class DistillationStep:
    """Loss of one micro-batch on the fused path.

    ``__call__(input_ids, attention_mask, labels)`` returns the :class:`DistillationLoss` result for
    masked ``input_ids`` [B, S], ``attention_mask`` [B, S] and ``labels`` [B, S] (-100 where not
    masked). Equals ``Distiller.step`` of ``distiller.py`` in MLM mode (KL on every non-pad token, or
    on masked tokens only with ``restrict_kl_to_mask``; CE on masked tokens; cosine on non-pad
    tokens' last hidden states) without materialising the [B, S, V] logits. With causal LMs and
    ``labels = causal_labels(input_ids, attention_mask)`` (no masking) it equals its causal branch
    (``--mlm`` off): KL on every non-pad token, the CE is the next-token loss ``alpha_clm`` weighs (the
    loss's ``mlm`` part), cosine as above (:func:`distil.reference.distiller_causal_step`).
    ``vocab_size`` cuts both heads to their first rows (the tokenizer's real vocabulary, when the two
    models pad it to different sizes).
    ``grad_scale``: the factor the caller multiplies ``total`` by before ``backward()`` (see
    :class:`DistillationLoss`). ``student_rows`` is a :class:`StudentRows` or the DDP module that wraps one.
    The step picks the KL rows itself, so ``loss_fn`` sees only those rows and must not restrict them a second time.
    Parts weighted 0 are not computed: without KL the logits are the masked rows only and the teacher's
    LM head does not run; without KL and cosine the teacher does not run at all.
    A ``loss_fn`` built with the models' heads (``DistillationLoss(student_head=..., teacher_head=...)``)
    gets the heads' transformed rows instead of logits: the fused head, no ``[M, V]`` logits at all.
    With ``teacher=None`` the teacher comes from a teacher cache instead (``__call__(..., cached)``, see
    :meth:`rows`), and ``cache_temperature`` is the T of its lse (``TeacherCache.temperature``, checked
    against the loss's); with a student head in the loss, the student's head is fused with the cached
    top-k teacher.
    """

    def __init__(self, student_rows, teacher, loss_fn, *, restrict_kl_to_mask=False, autocast_dtype=None,
                 cache_temperature=None, vocab_size=None):
        if not isinstance(restrict_kl_to_mask, bool):
            raise TypeError(f"restrict_kl_to_mask must be a bool, got {type(restrict_kl_to_mask).__name__}")
        if loss_fn.restrict_kl_to_mask:
            raise ValueError("loss_fn.restrict_kl_to_mask must be False: DistillationStep selects the KL rows "
                             "(pass restrict_kl_to_mask=True to the step instead)")
        self.student_rows = student_rows
        self.teacher_adapter = None if teacher is None else lm_adapter(teacher, vocab_size)
        self.loss_fn = loss_fn
        self.restrict_kl_to_mask = restrict_kl_to_mask
        self.autocast_dtype = autocast_dtype
        self.cache_temperature = cache_temperature

    def rows(self, input_ids, attention_mask, labels, cached=None):
        """The :class:`StepRows` of one micro-batch (what :meth:`__call__` hands to the loss). A step
        built with ``teacher=None`` reads the teacher from ``cached``, the ``[B, S, ...]`` tensors of
        :meth:`distil.teacher_cache.TeacherCache.batch` (top-k logits, their indices, lse, and the hidden
        states when the cosine is on), at the rows the live teacher would compute."""
        with_kl, with_cos = self.loss_fn.kl_weight > 0, self.loss_fn.cos_weight > 0
        non_pad = attention_mask.bool()
        # KL rows: non-pad (default) or masked; without KL only the MLM rows (masked) need logits.
        # The cosine reads the non-pad rows: the KL rows' own gather when those are the non-pad rows.
        logit_mask = non_pad if with_kl and not self.restrict_kl_to_mask else labels != -100
        hidden_mask = (logit_mask if logit_mask is non_pad else non_pad) if with_cos else None
        device_type = input_ids.device.type
        project = self.loss_fn.head_loss is None  # with heads in the loss: the rows each projection multiplies
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            t_logits = t_hidden = None
            if self.teacher_adapter is None:
                if with_kl:
                    t_logits = TopKLogits(cached["topk_logits"][logit_mask], cached["topk_index"][logit_mask],
                                          cached["lse"][logit_mask], self.cache_temperature)
                if with_cos:
                    t_hidden = cached["hidden"][hidden_mask]
            elif with_kl or with_cos:
                with torch.no_grad():
                    t_logits, t_hidden = select_rows(self.teacher_adapter, input_ids, attention_mask,
                                                     logit_mask if with_kl else None, hidden_mask, project)
            s_logits, s_hidden = self.student_rows(input_ids, attention_mask, logit_mask, hidden_mask, project)
        return StepRows(s_logits, t_logits, labels[logit_mask], s_hidden, t_hidden)

    def __call__(self, input_ids, attention_mask, labels, cached=None, *, grad_scale=None):
        # Pre-gathered rows: the cosine rows (non-pad) may differ from the logit rows, which
        # DistillationLoss accepts when no attention mask is passed.
        rows = self.rows(input_ids, attention_mask, labels, cached)
        if self.loss_fn.head_loss is None:
            return self.loss_fn(*rows, None, grad_scale=grad_scale)
        # The fused heads are the models' output projections: under the models' autocast, as F.linear
        # would be (a 16-bit teacher's LayerNorm hands them fp32 rows beside its 16-bit weight).
        cached = isinstance(rows.teacher_logits, TopKLogits)
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.loss_fn(None, rows.teacher_logits if cached else None, rows.labels, rows.student_hidden,
                                rows.teacher_hidden, None, student_head_input=rows.student_logits,
                                teacher_head_input=None if cached else rows.teacher_logits, grad_scale=grad_scale)
