"""Drop-in: distil's DistillationLoss in a plain PyTorch training loop.

    masker = MLMMasker(len(tok), tok.all_special_ids, tok.mask_token_id, counts=token_counts(seqs, len(tok)))
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    losses = distill(student, teacher, LengthGroupedBatches(seqs, 32, seed=56, pad_id=tok.pad_token_id),
                     masker, optimizer, steps=1000)

Each step is distiller.py's ``Distiller.step`` + ``optimize`` (no accumulation): dynamic masking,
teacher forward without gradient, student forward, the fused triple loss on full logits (rows are
selected inside the kernels), backward, clipping at 5.0, AdamW step.
"""
import torch

from distil.fused_loss import DistillationLoss


def distill(student, teacher, batches, masker, optimizer, *, steps, loss_fn=None, max_grad_norm=5.0, seed=56):
    """Train ``student`` for ``steps`` batches of ``batches`` (dicts of input_ids, attention_mask);
    returns the per-step ``DistillationLossOutput`` values as floats (total, kl, mlm, cos)."""
    loss_fn = loss_fn or DistillationLoss()
    teacher.eval().requires_grad_(False)
    student.train()
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # masking runs on the CPU batches
    history = []
    for _, batch in zip(range(steps), batches):
        ids, labels = masker(batch["input_ids"], batch["attention_mask"], generator)
        ids, labels, attn = (t.to(device) for t in (ids, labels, batch["attention_mask"]))
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s = student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        out = loss_fn(s.logits, t.logits, labels, s.hidden_states[-1], t.hidden_states[-1], attn.bool())
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(tuple(float(v.detach()) for v in out))
    return history
