"""Language-model scores on a held-out text file (``distil-eval --lm-text``): masked-token accuracy and
loss for masked LMs, next-token perplexity and accuracy for causal LMs. The text is cut into sequences
as :func:`distil.data.load_corpus` cuts the training corpus."""
import math

import torch

from distil.data import load_corpus
from distil.evaluate.models import load_lm, load_tokenizer
from distil.masking import MLMMasker
from distil.step import causal_labels


def lm_sequences(text_path, tokenizer, max_length):
    """The token-id sequences of ``text_path`` (:func:`distil.data.load_corpus`); a ValueError naming the
    file when none survives."""
    sequences = load_corpus([text_path], tokenizer, max_length=max_length)
    if not sequences:
        raise ValueError(f"lm_text {text_path}: no sequence survived tokenisation and filtering (lines of at least "
                         "12 tokens with under 50% unknown tokens are kept)")
    return sequences


def padded_batches(sequences, batch_size, pad_id):
    """``(input_ids, attention_mask)`` int64 ``[b, L]`` of consecutive ``batch_size`` sequences, right
    padded with ``pad_id`` to the longest of each batch."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        yield ids, attention_mask


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def masked_lm_metrics(model_path, text_path, *, max_length=128, mask_prop=0.15, seed=0, batch_size=32):
    """Masked-token accuracy and mean cross-entropy of ``model_path``'s masked-LM head on the text
    file ``text_path`` (one document per line, cut into sequences as :func:`distil.data.load_corpus`
    does). ``mask_prop`` of each batch's non-special tokens are drawn uniformly with a generator
    seeded ``seed`` and all replaced by the mask token, so models sharing a tokenizer see the same
    positions. Returns None when the directory has no masked-LM head (an encoder-only checkpoint),
    else ``{"accuracy", "loss", "masked_tokens"}``. Equivalent of ``AutoModelForMaskedLM`` with
    ``DataCollatorForLanguageModeling(mlm_probability=mask_prop)`` at 100% ``[MASK]``, loss summed
    over the masked tokens then divided by their number."""
    loaded = load_lm(model_path)
    if loaded is None:
        return None
    model, causal = loaded
    if causal:
        raise ValueError(f"models: {model_path} is a causal LM; its held-out score is causal_lm_metrics'")
    tokenizer = load_tokenizer(model_path)
    device = _device()
    model.to(device).eval()
    sequences = lm_sequences(text_path, tokenizer, max_length)
    masker = MLMMasker(
        len(tokenizer), tokenizer.all_special_ids, tokenizer.mask_token_id,
        mask_prop=mask_prop, word_mask=1.0, word_keep=0.0, word_rand=0.0, smoothing=0.0,
    )
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for ids, attention_mask in padded_batches(sequences, batch_size, tokenizer.pad_token_id):
            masked, labels = masker(ids, attention_mask, generator)
            logits = model(input_ids=masked.to(device), attention_mask=attention_mask.to(device)).logits.float()
            chosen = labels.to(device) != -100
            rows, targets = logits[chosen], labels.to(device)[chosen]
            loss_sum += torch.nn.functional.cross_entropy(rows, targets, reduction="sum").item()
            correct += (rows.argmax(-1) == targets).sum().item()
            count += targets.numel()
    if count == 0:
        return {"accuracy": 0.0, "loss": 0.0, "masked_tokens": 0}
    return {"accuracy": correct / count, "loss": loss_sum / count, "masked_tokens": count}


def causal_lm_metrics(model_path, text_path, *, max_length=128, batch_size=32):
    """Next-token scores of the causal LM ``model_path`` on the text file ``text_path`` (sequences as
    :func:`distil.data.load_corpus` cuts them, each framed BOS ... EOS, right-padded per batch): the mean
    cross-entropy over every token that has a next one (``loss``), ``perplexity = exp(loss)``, the
    top-1 accuracy of the next token, and the number of predicted tokens. Equivalent of Hugging Face's
    ``model(input_ids, attention_mask, labels=ids with -100 at padding).loss`` (the shifted CE,
    ``run_clm.py``'s evaluation) summed over the tokens of every batch rather than averaged per batch.
    Returns None when the directory has no LM head."""
    loaded = load_lm(model_path)
    if loaded is None:
        return None
    model, causal = loaded
    if not causal:
        raise ValueError(f"models: {model_path} is a masked LM; its held-out score is masked_lm_metrics'")
    tokenizer = load_tokenizer(model_path)
    device = _device()
    model.to(device).eval()
    sequences = lm_sequences(text_path, tokenizer, max_length)
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for ids, attention_mask in padded_batches(sequences, batch_size, tokenizer.pad_token_id):
            labels = causal_labels(ids, attention_mask).to(device)  # the next token on the row predicting it
            logits = model(input_ids=ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            chosen = labels != -100
            rows, targets = logits[chosen], labels[chosen]
            loss_sum += torch.nn.functional.cross_entropy(rows, targets, reduction="sum").item()
            correct += (rows.argmax(-1) == targets).sum().item()
            count += targets.numel()
    loss = loss_sum / max(count, 1)
    return {"perplexity": math.exp(loss), "loss": loss, "accuracy": correct / max(count, 1), "tokens": count}
