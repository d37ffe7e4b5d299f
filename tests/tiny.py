"""Tiny models, tokenizers and corpora built on the fly for the harness tests (nothing downloads).

Shared by the student / masking / data tests and the trainer tests:
- ``corpus_lines`` / ``write_corpus``: a deterministic synthetic English-like corpus.
- ``bert_tokenizer`` / ``roberta_tokenizer`` / ``gpt2_tokenizer``: fast Hugging Face tokenizers trained
  here with ``tokenizers`` (WordPiece for BERT, byte-level BPE for RoBERTa and GPT-2), standard
  special-token ids (GPT-2's: one ``<|endoftext|>``, no pad token).
- ``tiny_bert`` / ``tiny_roberta``: masked-LM teachers (4 layers, H=32 by default) whose every
  parameter is random, so "copied equals teacher" checks cannot pass on zeros or ones.
- ``tiny_causal``: a causal-LM teacher of each family ``distil.student`` supports (4 layers, H=32,
  sliding-window attention on some layers where the family has it), every parameter random.
- ``random_batch``: padded ``input_ids`` / ``attention_mask`` of varied lengths.
"""
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizer,
)

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "model teacher student layer token mask vocabulary distillation temperature gradient kernel "
    "matrix softmax hidden state loss batch sequence attention transformer embedding position "
    "training corpus sentence language paper figure result value memory speed compute divergence"
).split()


def corpus_lines(n_lines=200, seed=0, min_words=3, max_words=40):
    """Deterministic lines of Zipf-distributed words (frequent words are much more frequent,
    as in real text, so frequency smoothing in the masker has something to act on)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(min_words, max_words)
        lines.append(" ".join(rng.choices(_WORDS, weights=weights, k=n)) + ".")
    return lines


def write_corpus(directory, n_files=2, n_lines=100, seed=0, **line_kwargs):
    """Write ``n_files`` text files (one document per line) under ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        path = directory / f"part{i}.txt"
        path.write_text("\n".join(corpus_lines(n_lines, seed=seed + i, **line_kwargs)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def bert_tokenizer(lines=None, vocab_size=200):
    """A lower-casing WordPiece ``BertTokenizer`` (fast) trained on ``lines`` (default: the tiny corpus)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(lines or corpus_lines(), trainer)
    return BertTokenizer(vocab=tok.get_vocab())


def _byte_level_bpe(lines, vocab_size, specials):
    """(vocab, merges) of a byte-level BPE trained on ``lines`` (default: the tiny corpus), ``specials`` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines or corpus_lines(), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    return tok.get_vocab(), merges


def roberta_tokenizer(lines=None, vocab_size=300):
    """A byte-level BPE ``RobertaTokenizer`` (fast) trained on ``lines`` (default: the tiny corpus)."""
    vocab, merges = _byte_level_bpe(lines, vocab_size, ROBERTA_SPECIALS)
    return RobertaTokenizer(vocab=vocab, merges=merges)


def gpt2_tokenizer(lines=None, vocab_size=300):
    """A byte-level BPE ``GPT2Tokenizer`` (fast) as GPT-2's: ``<|endoftext|>`` (id 0) is bos and eos, no pad token."""
    vocab, merges = _byte_level_bpe(lines, vocab_size, ["<|endoftext|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def _randomize(model, seed):
    # Every tensor random (LayerNorm weights near 1, everything else small), tied weights stay tied.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name.lower() else 0.05 * noise)
    return model.eval()


def tiny_bert(vocab_size, layers=4, hidden=32, heads=2, intermediate=64, max_positions=64, seed=0, **config):
    """A random ``BertForMaskedLM`` teacher in eval mode; ``config`` overrides ``BertConfig`` fields."""
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        **config,
    )
    return _randomize(BertForMaskedLM(cfg), seed)


def tiny_roberta(vocab_size, layers=4, hidden=32, heads=2, intermediate=64, max_positions=64, seed=0, **config):
    """A random ``RobertaForMaskedLM`` teacher in eval mode (pad id 1, positions offset by 2 as in RoBERTa)."""
    cfg = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **config,
    )
    return _randomize(RobertaForMaskedLM(cfg), seed)


# family -> (model class, config class, fields beyond the shared sizes).  The sliding windows (4) are
# shorter than the tests' sequences, so a layer of the wrong attention kind changes the logits; the
# patterns differ across the 4 layers so that a student's layer_types depend on which layers it keeps.
CAUSAL_FAMILIES = {
    "gpt2": (GPT2LMHeadModel, GPT2Config, {}),
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"tie_word_embeddings": True, "layer_types": [
        "full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "use_sliding_window": True, "sliding_window": 4}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 4}),
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, {"sliding_window": 4, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, {"sliding_window": 4, "head_dim": 16, "query_pre_attn_scalar": 16,
                                                      "sliding_window_pattern": 3}),
}


def tiny_causal(family, vocab_size, layers=4, hidden=32, heads=2, intermediate=64, max_positions=64, seed=0, **config):
    """A random causal-LM teacher of ``family`` (a key of ``CAUSAL_FAMILIES``) in eval mode; ``config``
    overrides its config fields.  Token ids: pad 0, bos 1, eos 2."""
    model_cls, config_cls, fields = CAUSAL_FAMILIES[family]
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        sizes = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": intermediate,
                 "n_positions": max_positions}
    else:
        sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "num_key_value_heads": 1, "intermediate_size": intermediate,
                 "max_position_embeddings": max_positions}
    cfg = config_cls(vocab_size=vocab_size, **sizes, **ids, **{**fields, **config})
    return _randomize(model_cls(cfg), seed)


def random_batch(vocab_size, batch_size, seq_len, *, cls_id, sep_id, pad_id, first_regular_id=5, seed=0):
    """``input_ids`` [B, S] framed with CLS ... SEP and right-padded, lengths in [3, S] with the
    longest exactly S, and the matching int64 ``attention_mask``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    ids = torch.randint(first_regular_id, vocab_size, (batch_size, seq_len), generator=g)
    positions = torch.arange(seq_len)
    attention_mask = (positions < lengths[:, None]).long()
    ids[:, 0] = cls_id
    ids[positions == (lengths[:, None] - 1)] = sep_id
    ids[attention_mask == 0] = pad_id
    return ids, attention_mask
