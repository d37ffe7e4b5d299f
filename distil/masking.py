"""Dynamic masked-LM masking with token-frequency smoothing, as in the DistilBERT paper.

Equivalent of ``Distiller.prepare_batch_mlm`` in the paper's ``distiller.py`` (Hugging Face
``examples/research_projects/distillation``), with the token weights of its ``train.py``:
``max(count, 1) ** -smoothing`` and 0 for special tokens.  One deliberate difference: under fp16
the paper trims the target count to a multiple of 8 (a tensor-core alignment of its full-logit
CE); distil's losses run on gathered rows and do not need it, so the count is exactly
``ceil(mask_prop * tokens)``.
"""
import math

import torch

from distil._ops.common import check_tensor, check_token_batch
from distil.checks import check_int, check_masking


def token_counts(sequences, vocab_size):
    """Occurrences of each token id over ``sequences`` (lists of ints or 1-D integer tensors):
    an int64 tensor ``[vocab_size]``.  Equivalent of the paper's ``scripts/token_counts.py``
    (``collections.Counter`` over the binarized corpus, as a dense array)."""
    check_int("vocab_size", vocab_size, 1)
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
        raise TypeError(f"sequences must be an iterable of token-id sequences, got {type(sequences).__name__}")
    flat = []
    for i, seq in enumerate(sequences):
        ids = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq, dtype=torch.int64)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"sequences[{i}] must be a 1-D sequence of integer ids")
        flat.append(ids.cpu().long())
    if not flat:
        return torch.zeros(vocab_size, dtype=torch.int64)
    ids = torch.cat(flat)  # one bincount for the corpus, not one per sequence
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = next(i for i, t in enumerate(flat) if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size))
        raise ValueError(f"sequences[{bad}] has ids outside [0, {vocab_size})")
    return torch.bincount(ids, minlength=vocab_size)


class MLMMasker:
    """Chooses and corrupts the masked-LM targets of a batch.

    Per call (the paper's ``prepare_batch_mlm``):

    1. each position gets weight ``max(count[token], 1) ** -smoothing`` (all counts 1 when
       ``counts`` is None), 0 for ``special_ids`` and where ``attention_mask`` is 0;
    2. ``ceil(mask_prop * attention_mask.sum())`` positions are drawn with
       ``torch.multinomial(weights, n, replacement=False)`` (capped at the number of positions
       with positive weight, so a batch of special tokens only gives no target, not an error);
    3. each chosen token becomes ``mask_id`` with probability ``word_mask``, stays itself with
       ``word_keep``, or becomes a uniform random id in ``[0, vocab_size)`` with ``word_rand``.

    ``__call__(input_ids, attention_mask, generator)`` returns ``(masked_ids, labels)``: labels hold
    the original id at chosen positions and -100 elsewhere.  All randomness comes from
    ``generator`` (on the device of ``input_ids``), so a seed fixes the result.
    """

    def __init__(
        self,
        vocab_size,
        special_ids,
        mask_id,
        counts=None,
        mask_prop=0.15,
        word_mask=0.8,
        word_keep=0.1,
        word_rand=0.1,
        smoothing=0.7,
    ):
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.mask_id = check_int("mask_id", mask_id, 0, vocab_size - 1)
        if isinstance(special_ids, (str, bytes)) or not hasattr(special_ids, "__iter__"):
            raise TypeError(f"special_ids must be an iterable of ints, got {type(special_ids).__name__}")
        special_ids = [check_int(f"special_ids[{i}]", t, 0, vocab_size - 1) for i, t in enumerate(special_ids)]
        mask_prop, word_mask, word_keep, word_rand, smoothing = check_masking(
            mask_prop, word_mask, word_keep, word_rand, smoothing)
        self.mask_prop = mask_prop
        if counts is None:
            counts = torch.ones(vocab_size, dtype=torch.int64)
        check_tensor("counts", counts, ndims=(1,))
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
        if counts.numel() != vocab_size:
            raise ValueError(f"counts must have vocab_size={vocab_size} entries, got {counts.numel()}")
        if int(counts.min()) < 0:
            raise ValueError("counts must be >= 0")
        weights = counts.double().clamp_min(1.0).pow(-smoothing)
        weights[special_ids] = 0.0
        self.token_weights = weights.float()
        # order of the outcomes drawn per chosen token: [MASK], keep, random
        self.outcome_probs = torch.tensor([word_mask, word_keep, word_rand], dtype=torch.float32)

    def __call__(self, input_ids, attention_mask, generator):
        check_token_batch(input_ids, attention_mask)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != input_ids.device.type:
            raise ValueError(f"generator is on {generator.device} but input_ids is on {input_ids.device}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids has ids outside [0, {self.vocab_size})")

        device = input_ids.device
        real = attention_mask != 0
        # index_select, not tensor[ids]: advanced indexing is ~1000x slower on CPU for this gather
        weights = self.token_weights.to(device).index_select(0, input_ids.flatten()) * real.flatten()
        n_targets = min(math.ceil(self.mask_prop * int(real.sum())), int((weights > 0).sum()))
        if n_targets == 0:  # nothing maskable (empty batch, specials only): no targets, not an error
            return input_ids.clone(), torch.full_like(input_ids, -100)
        chosen = torch.zeros(input_ids.numel(), dtype=torch.bool, device=device)
        chosen[torch.multinomial(weights, n_targets, replacement=False, generator=generator)] = True
        chosen = chosen.view_as(input_ids)

        originals = input_ids[chosen]
        outcome = torch.multinomial(self.outcome_probs.to(device), n_targets, replacement=True, generator=generator)
        random_ids = torch.randint(self.vocab_size, originals.shape, generator=generator, device=device)
        replaced = torch.where(outcome == 0, self.mask_id, torch.where(outcome == 1, originals, random_ids))
        return input_ids.masked_scatter(chosen, replaced), torch.where(chosen, input_ids, -100)
