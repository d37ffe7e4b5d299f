"""The model side of one distillation step: bodies on the whole batch, both LM heads on the loss rows only.

:class:`DistillationStep` is what ``distil-train`` runs per micro-batch and what
``benchmarks/bench_step.py`` measures against ``distiller.py``'s eager step.
"""
import torch
from torch import nn

from distil.ops import masked_gather
from distil.student import lm_adapter


def select_rows(adapter, input_ids, attention_mask, kl_mask, cos_mask):
    """Body on the whole batch, LM head on the KL rows only. Returns (logits [M, V] of the ``kl_mask``
    rows, last hidden rows [M', H] of the ``cos_mask`` rows; the KL rows themselves when ``cos_mask``
    is None). The eager equivalent is ``model(...).logits[kl_mask]`` and ``hidden_states[-1][cos_mask]``."""
    hidden = adapter.body(input_ids, attention_mask)
    kl_hidden = masked_gather(hidden, kl_mask)[0]
    cos_hidden = kl_hidden if cos_mask is None else masked_gather(hidden, cos_mask)[0]
    return adapter.head(kl_hidden), cos_hidden


class StudentRows(nn.Module):
    """The student's part of a step as one module, so that DDP wrapping it sees a forward call
    (the adapter calls the model's submodules directly, which would bypass DDP's hooks)."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self._adapter = lm_adapter(student)

    def forward(self, input_ids, attention_mask, kl_mask, cos_mask):
        return select_rows(self._adapter, input_ids, attention_mask, kl_mask, cos_mask)


class DistillationStep:
    """Loss of one micro-batch on the fused path.

    ``__call__(input_ids, attention_mask, labels)`` returns the :class:`DistillationLoss` result for
    masked ``input_ids`` [B, S], ``attention_mask`` [B, S] and ``labels`` [B, S] (-100 where not
    masked). Equals ``Distiller.step`` of ``distiller.py`` in MLM mode (KL on every non-pad token, or
    on masked tokens only with ``restrict_kl_to_mask``; CE on masked tokens; cosine on non-pad
    tokens' last hidden states) without materialising the [B, S, V] logits.
    ``grad_scale``: the factor the caller multiplies ``total`` by before ``backward()`` (see
    :class:`DistillationLoss`). ``student_rows`` is a :class:`StudentRows` or the DDP module that wraps one. The step picks the KL
    rows itself, so ``loss_fn`` sees only those rows and must not restrict them a second time.
    """

    def __init__(self, student_rows, teacher, loss_fn, *, restrict_kl_to_mask=False, autocast_dtype=None):
        if not isinstance(restrict_kl_to_mask, bool):
            raise TypeError(f"restrict_kl_to_mask must be a bool, got {type(restrict_kl_to_mask).__name__}")
        if loss_fn.restrict_kl_to_mask:
            raise ValueError("loss_fn.restrict_kl_to_mask must be False: DistillationStep selects the KL rows "
                             "(pass restrict_kl_to_mask=True to the step instead)")
        self.student_rows = student_rows
        self.teacher_adapter = lm_adapter(teacher)
        self.loss_fn = loss_fn
        self.restrict_kl_to_mask = restrict_kl_to_mask
        self.autocast_dtype = autocast_dtype

    def __call__(self, input_ids, attention_mask, labels, *, grad_scale=None):
        non_pad = attention_mask.bool()
        # restrict: KL rows = masked rows (MLM rows = KL rows) and the cosine needs its own non-pad gather;
        # default: KL rows = non-pad rows ⊇ MLM rows, and the cosine reuses them.
        kl_mask, cos_mask = (labels != -100, non_pad) if self.restrict_kl_to_mask else (non_pad, None)
        device_type = input_ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            with torch.no_grad():
                t_logits, t_hidden = select_rows(self.teacher_adapter, input_ids, attention_mask, kl_mask, cos_mask)
            s_logits, s_hidden = self.student_rows(input_ids, attention_mask, kl_mask, cos_mask)
        # Pre-gathered rows: with restrict the cosine rows (non-pad) differ from the KL/MLM rows (masked),
        # which DistillationLoss accepts when no attention mask is passed.
        return self.loss_fn(s_logits, t_logits, labels[kl_mask], s_hidden, t_hidden, None, grad_scale=grad_scale)
