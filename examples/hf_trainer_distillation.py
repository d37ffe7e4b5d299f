"""Drop-in: distil's DistillationLoss inside a Hugging Face ``Trainer`` (its ``compute_loss``).

The teacher is frozen; masking comes from transformers' own ``DataCollatorForLanguageModeling``
(15 %, 80/10/10). The loss gets the full ``[B, S, V]`` logits and ``[B, S, H]`` hidden states and
selects the rows itself (KL and cosine on non-pad tokens, MLM on masked ones), i.e. exactly
distiller.py's ``Distiller.step`` loss, fused. ``distil-train`` (distil/train.py) is the faster
path: it runs the LM heads on the selected rows only.

    trainer = DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(...),
                                  train_dataset=[{"input_ids": ids}, ...],
                                  data_collator=DataCollatorForLanguageModeling(tokenizer))
    trainer.train()
"""
import torch
from transformers import Trainer

from distil.fused_loss import DistillationLoss


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``DistillationLoss`` against ``teacher`` (frozen, eval)."""

    def __init__(self, *args, teacher, loss_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distillation_loss = loss_fn or DistillationLoss()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # num_items_in_batch is not needed: every part of the loss is already a mean over its rows.
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        with torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        out = self.distillation_loss(s.logits, t.logits, inputs["labels"], s.hidden_states[-1],
                                     t.hidden_states[-1], attn.bool())
        return (out.total, s) if return_outputs else out.total
