"""Drop-in: TRL's ``GKDTrainer`` with its generalised-JSD loss replaced by distil's fused one.

``DistilGKDTrainer`` keeps everything of TRL's GKD (on-policy sampling with probability ``lmbda``,
``seq_kd``, its config and callbacks) and overrides ``compute_loss`` only: the loss is
``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=args.beta)`` on the
shifted rows, i.e. ``distil.fused_loss.kl_div_loss(s, t, temperature=1.0, mask=labels != -100,
divergence="jsd", jsd_beta=beta)``, and by default it never builds the ``[B, S, V]`` logits at all:
the LM heads are fused into the loss (``linear_kl_ce_loss`` from the last hidden states and
``lm_head``), so the memory is O(chunk · V) rather than O(B · S · V) for the student and the teacher.

Temperature: TRL's ``args.temperature`` is the *sampling* temperature of the on-policy completions; its
loss is taken at T = 1 with no T² factor. distil's losses are ``T² · D(softmax(t / T) ‖ softmax(s / T))``
(distiller.py's convention), so at ``temperature=1.0`` they are TRL's numbers; a distillation
temperature T would scale the loss by T² and its divergence by the softening.

    trainer = DistilGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(..., beta=0.5),
                               train_dataset=..., processing_class=tokenizer)
    trainer.train()

Run this file to train a tiny random Llama pair built here (no downloads) for a few steps, printing
distil's loss next to TRL's on the first batch.
"""
import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

from distil.fused_loss import kl_div_loss, linear_kl_ce_loss

IGNORE_INDEX = -100


class DistilGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose loss is distil's generalised JSD (``divergence="jsd", jsd_beta=args.beta``);
    ``fused_head=False`` takes it on the models' logits instead of through their fused LM heads."""

    def __init__(self, *args, fused_head=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_head = fused_head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        kl_mask = inputs["labels"][:, 1:] != IGNORE_INDEX  # row i predicts token i + 1: TRL's causal shift
        self.teacher_model.eval()
        outputs = None
        if self.fused_head and not return_outputs:
            student, teacher = self.accelerator.unwrap_model(model), self.accelerator.unwrap_model(self.teacher_model)
            # The bodies without their LM heads, under the mixed precision the wrapped models' forwards use.
            with self.accelerator.autocast():
                student_hidden = student.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                with torch.no_grad():
                    teacher_hidden = teacher.base_model(input_ids=ids,
                                                        attention_mask=attention_mask).last_hidden_state
            s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
            # Gemma 2/3 would add logit_softcap=config.final_logit_softcapping (and the teacher's).
            loss, _ = linear_kl_ce_loss(
                student_hidden[:, :-1], s_head.weight, getattr(s_head, "bias", None), None,
                teacher_head_input=teacher_hidden[:, :-1], teacher_weight=t_head.weight,
                teacher_bias=getattr(t_head, "bias", None), temperature=1.0, kl_mask=kl_mask, ce_weight=0.0,
                divergence="jsd", jsd_beta=self.beta)
        else:
            outputs = model(input_ids=ids, attention_mask=attention_mask)
            with torch.no_grad():
                teacher_logits = self.teacher_model(input_ids=ids, attention_mask=attention_mask).logits
            loss = kl_div_loss(outputs.logits[:, :-1], teacher_logits[:, :-1], temperature=1.0, mask=kl_mask,
                               divergence="jsd", jsd_beta=self.beta)
        if num_items_in_batch is not None:
            # TRL's gradient-accumulation normalisation: the sum over the rows by the global row count.
            loss = loss * kl_mask.sum() / num_items_in_batch
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------ a tiny self-contained run
def tiny_tokenizer(vocab_size=96):
    """A word-level tokenizer of ``vocab_size`` made-up words ``w0, w1, ...`` and pad/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def tiny_llama(vocab_size, hidden=32, layers=2, seed=0, init_std=0.3):
    """A random LlamaForCausalLM; ``init_std`` well above Llama's 0.02, so that its next-token
    distributions are far from uniform and the divergence is not a rounding residue."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                         initializer_range=init_std)
    return LlamaForCausalLM(config)


def prompt_completion_rows(vocab_size, n=16, seed=0):
    """``{"input_ids", "prompt_length"}`` rows of random words: a prompt and the completion the loss sees."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, completion = (int(x) for x in torch.randint(2, 8, (2,), generator=g))
        ids = torch.randint(2, vocab_size, (prompt + completion,), generator=g).tolist() + [1]
        rows.append({"input_ids": ids, "prompt_length": prompt})
    return rows


def collate(rows):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, r["prompt_length"]:n] = ids[i, r["prompt_length"]:n]
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def build_trainer(output_dir, beta=0.5, fused_head=True, max_steps=2):
    """The tiny student, teacher and data in a :class:`DistilGKDTrainer` (off-policy: ``lmbda=0``; fp32:
    GKDConfig's default is bf16 autocast)."""
    tokenizer = tiny_tokenizer()
    student, teacher = tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), hidden=48, seed=1)
    args = GKDConfig(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=max_steps,
                     learning_rate=1e-3, lmbda=0.0, beta=beta, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no",
                     logging_steps=1, dataloader_num_workers=0, seed=0)
    return DistilGKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                            train_dataset=Dataset.from_list(prompt_completion_rows(len(tokenizer))),
                            processing_class=tokenizer,
                            fused_head=fused_head)


def main():
    import tempfile

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(output_dir)
        batch = collate(prompt_completion_rows(len(trainer.processing_class), n=4, seed=1))
        ours = trainer.compute_loss(trainer.model, batch)
        with torch.no_grad():
            s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = trainer.teacher_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], beta=trainer.beta)
        print(f"distil (fused heads) {ours.item():.6f}   TRL generalized_jsd_loss {trl.item():.6f}")
        print(f"trained: loss {trainer.train().training_loss:.6f}")


if __name__ == "__main__":
    main()
