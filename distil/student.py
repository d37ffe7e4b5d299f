"""Student construction from a Hugging Face masked-LM teacher, and per-architecture adapters.

- :func:`layer_map` picks which teacher layers initialise the student (the paper's
  [0, 2, 4, 7, 9, 11] for 12 -> 6, generalised to any depth).
- :func:`build_student` builds the student: the teacher's class with fewer layers (default), or a
  standard ``DistilBertForMaskedLM`` from a BERT teacher.  Equivalent of the paper's
  ``scripts/extract_distilbert.py`` followed by ``from_pretrained``, except that the whole LM head
  (transform, LayerNorm, decoder and bias) is copied, not only the decoder.
- :func:`save_student` writes a normal model directory (safetensors) that
  ``AutoModelForMaskedLM.from_pretrained`` loads.
- :func:`lm_adapter` splits a model into "body" (transformer, last hidden states) and "head"
  (hidden rows -> vocabulary logits), so the trainer can run the vocabulary projection only on the
  rows the loss needs.  It calls the model's own submodules; no model code is copied.
"""
import copy
import os
import re
from pathlib import Path

import torch
from transformers import (
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    PreTrainedModel,
    RobertaForMaskedLM,
)

from distil._ops.common import check_tensor

_TEACHER_CLASSES = (BertForMaskedLM, RobertaForMaskedLM)
_LAYER_KEY = re.compile(r"^(.*\.encoder\.layer\.)(\d+)(\..*)$")

# BERT layer submodule -> DistilBERT layer submodule (same math: post-LN self-attention + FFN).
_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
_DISTILBERT_LN_EPS = 1e-12  # hard-coded in DistilBERT's modules


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def layer_map(teacher_layers, student_layers=None):
    """Teacher layer index that initialises each student layer.

    ``student_layers`` defaults to ``teacher_layers // 2`` (at least 1).  The map spreads the
    student layers evenly over the teacher, keeping the first and the last:
    ``round_half_up(i * (L - 1) / (n - 1))`` for ``i = 0..n-1`` (``[0]`` when ``n == 1``), computed
    in integers.  For 12 -> 6 this is exactly the paper's ``[0, 2, 4, 7, 9, 11]``
    (``scripts/extract_distilbert.py``); the result is strictly increasing for any ``n <= L``.
    """
    _check_int("teacher_layers", teacher_layers, 1, 10**6)
    if student_layers is None:
        student_layers = max(1, teacher_layers // 2)
    _check_int("student_layers", student_layers, 1, teacher_layers)
    if student_layers == 1:
        return [0]
    span, steps = teacher_layers - 1, student_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(student_layers)]


def _check_teacher(teacher):
    if not isinstance(teacher, _TEACHER_CLASSES):
        names = ", ".join(c.__name__ for c in _TEACHER_CLASSES)
        raise TypeError(f"teacher must be one of ({names}), got {type(teacher).__name__}")


def _resolve_layers(teacher_layers, num_layers, layers):
    if layers is None:
        return layer_map(teacher_layers, num_layers)
    if num_layers is not None:
        raise ValueError("give either num_layers or layers, not both")
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"layers must be a non-empty list of ints, got {layers!r}")
    for i, t in enumerate(layers):
        _check_int(f"layers[{i}]", t, 0, teacher_layers - 1)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a teacher layer, got {list(layers)}")
    return list(layers)


def build_student(teacher, *, num_layers=None, layers=None, as_distilbert=False):
    """A student initialised from ``teacher`` (``BertForMaskedLM`` or ``RobertaForMaskedLM``).

    Student layer ``i`` is a copy of teacher layer ``layers[i]`` (default: :func:`layer_map` of the
    teacher's depth and ``num_layers``, i.e. half the layers).  Embeddings (word, position,
    token type, LayerNorm) and the whole LM head (transform dense + LayerNorm, decoder weight and
    bias) are copied; the config is the teacher's with ``num_hidden_layers`` changed.  The student
    is on the teacher's device and dtype, in the teacher's train/eval mode.

    ``as_distilbert=True`` (BERT teachers only) returns a standard ``DistilBertForMaskedLM``
    with the same weights.  DistilBERT has no token-type embeddings, so token type 0's embedding
    is folded into the position embeddings: its logits equal the BERT-class student's for
    ``token_type_ids`` all 0 (BERT's default, and what distillation uses), up to float rounding
    of the changed summation order.  Requires ``layer_norm_eps == 1e-12`` (fixed in DistilBERT).

    Equivalent of ``scripts/extract_distilbert.py`` (which copies the head transform only with
    ``--vocab_transform``) followed by ``DistilBertForMaskedLM.from_pretrained``.
    """
    _check_teacher(teacher)
    if not isinstance(as_distilbert, bool):
        raise TypeError(f"as_distilbert must be a bool, got {type(as_distilbert).__name__}")
    chosen = _resolve_layers(teacher.config.num_hidden_layers, num_layers, layers)
    source = teacher.state_dict()
    if as_distilbert:
        student, state = _distilbert_student(teacher, chosen, source)
    else:
        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = len(chosen)
        student = type(teacher)(config)
        state = _renumbered_layers(source, chosen)
    param = next(teacher.parameters())
    # move before loading, so the copy happens in the teacher's dtype (no round trip through fp32)
    student.to(device=param.device, dtype=param.dtype).load_state_dict(state, strict=True)
    return student.train(teacher.training)


def _renumbered_layers(source, chosen):
    position = {t: i for i, t in enumerate(chosen)}
    state = {}
    for key, value in source.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in position:
            state[f"{match.group(1)}{position[int(match.group(2))]}{match.group(3)}"] = value
    return state


def _distilbert_student(teacher, chosen, source):
    if not isinstance(teacher, BertForMaskedLM):
        raise ValueError(f"as_distilbert needs a BertForMaskedLM teacher, got {type(teacher).__name__}")
    cfg = teacher.config
    if cfg.layer_norm_eps != _DISTILBERT_LN_EPS:
        raise ValueError(
            f"as_distilbert needs teacher layer_norm_eps == {_DISTILBERT_LN_EPS} (fixed in DistilBERT), "
            f"got {cfg.layer_norm_eps}"
        )
    if not isinstance(cfg.hidden_act, str):
        raise ValueError("as_distilbert needs the teacher's hidden_act to be a named activation")
    config = DistilBertConfig(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=len(chosen),
        n_heads=cfg.num_attention_heads,
        dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size,
        dropout=cfg.hidden_dropout_prob,
        attention_dropout=cfg.attention_probs_dropout_prob,
        activation=cfg.hidden_act,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    emb, head = "bert.embeddings.", "cls.predictions."
    state = {
        "distilbert.embeddings.word_embeddings.weight": source[emb + "word_embeddings.weight"],
        "distilbert.embeddings.position_embeddings.weight": source[emb + "position_embeddings.weight"]
        + source[emb + "token_type_embeddings.weight"][0],
        "distilbert.embeddings.LayerNorm.weight": source[emb + "LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": source[emb + "LayerNorm.bias"],
        "vocab_transform.weight": source[head + "transform.dense.weight"],
        "vocab_transform.bias": source[head + "transform.dense.bias"],
        "vocab_layer_norm.weight": source[head + "transform.LayerNorm.weight"],
        "vocab_layer_norm.bias": source[head + "transform.LayerNorm.bias"],
        "vocab_projector.weight": source[head + "decoder.weight"],
        "vocab_projector.bias": source[head + "bias"],
    }
    for i, t in enumerate(chosen):
        for bert_name, distil_name in _BERT_TO_DISTILBERT_LAYER.items():
            for kind in ("weight", "bias"):
                state[f"distilbert.transformer.layer.{i}.{distil_name}.{kind}"] = source[
                    f"bert.encoder.layer.{t}.{bert_name}.{kind}"
                ]
    return DistilBertForMaskedLM(config), state


def save_student(student, path, tokenizer=None):
    """Write ``student`` (and ``tokenizer`` if given) as a normal Hugging Face model directory.

    Equivalent of ``student.save_pretrained(path)`` (safetensors weights + config.json) and
    ``tokenizer.save_pretrained(path)``; ``AutoModelForMaskedLM.from_pretrained(path)`` loads it.
    Returns the directory as a ``pathlib.Path``.
    """
    if not isinstance(student, PreTrainedModel):
        raise TypeError(f"student must be a transformers PreTrainedModel, got {type(student).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {path} exists and is not a directory")
    student.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    # safetensors writes its file owner-only (0600); a model directory is meant to be shared like the
    # tokenizer and config files next to it, so give every file the umask's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    for file in path.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
    return path


class LMAdapter:
    """A masked-LM model split into ``body`` and ``head`` so that logits can be computed on
    selected rows only.  ``head(body(ids, mask))`` equals ``model(input_ids=ids,
    attention_mask=mask).logits`` (BERT: ``model.bert`` then ``model.cls``; RoBERTa:
    ``model.roberta`` then ``model.lm_head``; DistilBERT: ``model.distilbert`` then
    ``vocab_transform`` -> activation -> ``vocab_layer_norm`` -> ``vocab_projector``)."""

    def __init__(self, model, body_module, head_fn):
        self.model = model
        self._body_module = body_module
        self._head_fn = head_fn

    def body(self, input_ids, attention_mask):
        """Last hidden states ``[B, S, H]`` for int64 ``input_ids`` and ``attention_mask`` ``[B, S]``."""
        check_tensor("input_ids", input_ids, dtypes=(torch.int64,), ndims=(2,))
        check_tensor("attention_mask", attention_mask, ndims=(2,))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape {tuple(input_ids.shape)}"
            )
        return self._body_module(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head(self, hidden_rows):
        """Vocabulary logits ``[..., V]`` for hidden states ``[..., H]`` (any leading shape)."""
        check_tensor("hidden_rows", hidden_rows)
        if hidden_rows.dim() == 0 or hidden_rows.shape[-1] != self.model.config.hidden_size:
            raise ValueError(
                f"hidden_rows must end in the hidden size {self.model.config.hidden_size}, got shape {tuple(hidden_rows.shape)}"
            )
        return self._head_fn(hidden_rows)


def lm_adapter(model):
    """The :class:`LMAdapter` of a ``BertForMaskedLM``, ``RobertaForMaskedLM`` or
    ``DistilBertForMaskedLM``."""
    if isinstance(model, BertForMaskedLM):
        return LMAdapter(model, model.bert, model.cls)
    if isinstance(model, RobertaForMaskedLM):
        return LMAdapter(model, model.roberta, model.lm_head)
    if isinstance(model, DistilBertForMaskedLM):

        def distilbert_head(hidden):
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))

        return LMAdapter(model, model.distilbert, distilbert_head)
    raise TypeError(
        "model must be a BertForMaskedLM, RobertaForMaskedLM or DistilBertForMaskedLM, "
        f"got {type(model).__name__}"
    )
