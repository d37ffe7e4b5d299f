"""Inference speed of the compared models, measured side by side: the same inputs, the same batches,
the same machine, the models timed in alternation (one round of each, then the next round), each
reporting its median round, so a load change on the machine hits every model alike. After one
warm-up call each, in eval mode under ``torch.inference_mode``.

- :func:`classifier_throughput`: sequences/s of the sequence classifiers on the evaluation texts;
- :func:`forward_throughput`: tokens/s of the language models' forward on ``--lm-text`` sequences;
- :func:`generation_throughput`: generated tokens/s of causal LMs (greedy ``generate`` with the KV cache)."""
import statistics
import time

import torch

from distil.evaluate.lm_metrics import padded_batches
from distil.evaluate.models import load_classifier, load_lm, load_tokenizer


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _median_seconds(runs, rounds, device):
    """The median over ``rounds`` of each callable's wall time, the callables run in alternation after one
    warm-up call each."""
    times = [[] for _ in runs]
    with torch.inference_mode():
        for run in runs:
            run()
        for _ in range(rounds):
            for seconds, run in zip(times, runs):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def classifier_throughput(model_paths, texts, labels, *, batch_size, max_length, rounds):
    """Sequences/s of each model's classifier (``AutoModelForSequenceClassification``, its head fresh)
    on ``texts``: batches of ``batch_size``, padded to the longest in the batch, truncated at
    ``max_length``."""
    device = _device()
    runs = []
    for path in model_paths:
        tokenizer = load_tokenizer(path)
        model = load_classifier(path, labels, tokenizer).to(device).eval()
        batches = [
            tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt").to(device)
            for i in range(0, len(texts), batch_size)
        ]
        runs.append(lambda model=model, batches=batches: [model(**batch) for batch in batches])
    return [len(texts) / s for s in _median_seconds(runs, rounds, device)]


def _language_models(model_paths):
    models = []
    for path in model_paths:
        loaded = load_lm(path)
        if loaded is None:
            raise ValueError(f"models: {path} has no LM head (an encoder-only checkpoint); leave out --lm-text")
        models.append(loaded[0].to(_device()).eval())
    return models


def forward_throughput(model_paths, sequences, pad_id, *, batch_size, rounds):
    """Tokens/s (real tokens, padding excluded) of each model's LM forward (its logits included) over
    ``sequences`` (token-id lists of the shared tokenizer), batches of ``batch_size`` right-padded with
    ``pad_id``."""
    device = _device()
    batches = [(ids.to(device), mask.to(device)) for ids, mask in padded_batches(sequences, batch_size, pad_id)]
    tokens = sum(len(s) for s in sequences)
    runs = [lambda model=model: [model(input_ids=ids, attention_mask=mask) for ids, mask in batches]
            for model in _language_models(model_paths)]
    return [tokens / s for s in _median_seconds(runs, rounds, device)]


def generation_throughput(model_paths, prompts, pad_id, *, new_tokens, rounds):
    """Generated tokens/s of each causal LM: greedy ``generate`` (KV cache on) of exactly ``new_tokens``
    tokens after each of ``prompts`` (``[b, P]`` int64 token ids, one batch, no padding), i.e.
    ``b * new_tokens`` tokens per round."""
    device = _device()
    prompts = prompts.to(device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    runs = [lambda model=model: model.generate(prompts, attention_mask=torch.ones_like(prompts), **options)
            for model in _language_models(model_paths)]
    return [prompts.shape[0] * new_tokens / s for s in _median_seconds(runs, rounds, device)]
