"""Student construction from a Hugging Face masked-LM or causal-LM teacher, and per-architecture adapters.

- :func:`layer_map` picks which teacher layers initialise the student (the paper's
  [0, 2, 4, 7, 9, 11] for 12 -> 6, generalised to any depth).
- :func:`build_student` builds the student: the teacher's class with fewer layers (default), or a
  standard ``DistilBertForMaskedLM`` from a BERT teacher.  Equivalent of the paper's
  ``scripts/extract_distilbert.py`` (masked LMs) or ``scripts/extract.py`` (GPT-2) followed by
  ``from_pretrained``, except that the whole LM head (transform, LayerNorm, decoder and bias) is
  copied, not only the decoder.  Causal teachers: GPT-2, LLaMA, Qwen2/3, Mistral, Gemma2/3 (text).
- :func:`save_student` writes a normal model directory (safetensors) that
  ``AutoModelForMaskedLM.from_pretrained`` (or ``AutoModelForCausalLM``) loads.
- :func:`lm_adapter` splits a model into "body" (transformer, last hidden states) and "head"
  (hidden rows -> vocabulary logits), so the trainer can run the vocabulary projection only on the
  rows the loss needs.  It calls the model's own submodules; no model code is copied.
"""
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    RobertaForMaskedLM,
)

from distil._ops.common import check_tensor, check_token_batch
from distil.checks import check_int

# teacher class -> the state-dict prefix of its ModuleList of layers (the only part the student thins)
_LAYER_LISTS = {
    BertForMaskedLM: "bert.encoder.layer",
    RobertaForMaskedLM: "roberta.encoder.layer",
    GPT2LMHeadModel: "transformer.h",
    LlamaForCausalLM: "model.layers",
    Qwen2ForCausalLM: "model.layers",
    Qwen3ForCausalLM: "model.layers",
    MistralForCausalLM: "model.layers",
    Gemma2ForCausalLM: "model.layers",
    Gemma3ForCausalLM: "model.layers",
}

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


def layer_map(teacher_layers, student_layers=None):
    """Teacher layer index that initialises each student layer.

    ``student_layers`` defaults to ``teacher_layers // 2`` (at least 1).  The map spreads the
    student layers evenly over the teacher, keeping the first and the last:
    ``round_half_up(i * (L - 1) / (n - 1))`` for ``i = 0..n-1`` (``[0]`` when ``n == 1``), computed
    in integers.  For 12 -> 6 this is exactly the paper's ``[0, 2, 4, 7, 9, 11]``
    (``scripts/extract_distilbert.py``); the result is strictly increasing for any ``n <= L``.
    """
    check_int("teacher_layers", teacher_layers, 1, 10**6)
    if student_layers is None:
        student_layers = max(1, teacher_layers // 2)
    check_int("student_layers", student_layers, 1, teacher_layers)
    if student_layers == 1:
        return [0]
    span, steps = teacher_layers - 1, student_layers - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(student_layers)]


def _layer_list(teacher):
    if not isinstance(teacher, PreTrainedModel):
        raise TypeError(f"teacher must be a transformers PreTrainedModel, got {type(teacher).__name__}")
    for cls, prefix in _LAYER_LISTS.items():
        if isinstance(teacher, cls):
            return prefix
    names = ", ".join(c.__name__ for c in _LAYER_LISTS)
    raise ValueError(f"teacher {type(teacher).__name__} is not supported; supported: {names}")


def layer_list(model):
    """The ``nn.ModuleList`` of a supported model's transformer layers (``model.layers`` of a LLaMA,
    ``transformer.h`` of a GPT-2, ``distilbert.transformer.layer`` of a DistilBERT student...)."""
    if isinstance(model, DistilBertForMaskedLM):
        return model.distilbert.transformer.layer
    return model.get_submodule(_layer_list(model))


def _resolve_layers(teacher_layers, num_layers, layers):
    if layers is None:
        return layer_map(teacher_layers, num_layers)
    if num_layers is not None:
        raise ValueError("give either num_layers or layers, not both")
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"layers must be a non-empty list of ints, got {layers!r}")
    for i, t in enumerate(layers):
        check_int(f"layers[{i}]", t, 0, teacher_layers - 1)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a teacher layer, got {list(layers)}")
    return list(layers)


def build_student(teacher, *, num_layers=None, layers=None, as_distilbert=False):
    """A student initialised from ``teacher``: a masked LM (``BertForMaskedLM``,
    ``RobertaForMaskedLM``) or a causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``,
    ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``Gemma2ForCausalLM``,
    ``Gemma3ForCausalLM``).

    Student layer ``i`` is a copy of teacher layer ``layers[i]`` (default: :func:`layer_map` of the
    teacher's depth and ``num_layers``, i.e. half the layers).  Everything outside the layers is
    copied: embeddings (word, position, token type, LayerNorm), the final norm of decoders and the
    whole LM head (BERT/RoBERTa: transform dense + LayerNorm, decoder weight and bias); tied
    embeddings stay tied.  The config is the teacher's with the depth (``num_hidden_layers``,
    GPT-2's ``n_layer``) changed and the per-layer fields following their layers: ``layer_types``
    (sliding or full attention) is ``[teacher.layer_types[t] for t in layers]`` and Qwen's
    ``max_window_layers`` counts the chosen layers below it.  Each layer's ``layer_idx`` (the KV
    cache slot) is its student position.  Buffers (rotary frequencies) are the teacher's, in its
    dtype.  The student is on the teacher's device and dtype, in the teacher's train/eval mode.

    ``as_distilbert=True`` (BERT teachers only) returns a standard ``DistilBertForMaskedLM``
    with the same weights.  DistilBERT has no token-type embeddings, so token type 0's embedding
    is folded into the position embeddings: its logits equal the BERT-class student's for
    ``token_type_ids`` all 0 (BERT's default, and what distillation uses), up to float rounding
    of the changed summation order.  Requires ``layer_norm_eps == 1e-12`` (fixed in DistilBERT).

    Equivalent of ``scripts/extract_distilbert.py`` (which copies the head transform only with
    ``--vocab_transform``) followed by ``DistilBertForMaskedLM.from_pretrained``; for GPT-2, of
    ``scripts/extract.py`` (DistilGPT2: layers [0, 2, 4, 7, 9, 11] of 12, ``layer_map(12)``).
    """
    prefix = _layer_list(teacher)
    if not isinstance(as_distilbert, bool):
        raise TypeError(f"as_distilbert must be a bool, got {type(as_distilbert).__name__}")
    chosen = _resolve_layers(teacher.config.num_hidden_layers, num_layers, layers)
    source = teacher.state_dict()
    if as_distilbert:
        student, state = _distilbert_student(teacher, chosen, source)
    else:
        student = type(teacher)(_student_config(teacher.config, chosen))
        position = {t: i for i, t in enumerate(chosen)}
        state = {new: value for key, value in source.items() if (new := _renamed(key, prefix, position))}
    param = next(teacher.parameters())
    # move before loading, so the copy happens in the teacher's dtype (no round trip through fp32)
    student.to(device=param.device, dtype=param.dtype).load_state_dict(state, strict=True)
    if not as_distilbert:
        # from_pretrained keeps rotary frequencies in fp32 under a 16-bit model; the cast above
        # rounded the student's, so its layers would not compute the teacher's.
        for name, buffer in teacher.named_buffers():
            new_name = _renamed(name, prefix, position)
            if new_name is not None:
                module, _, attr = new_name.rpartition(".")
                setattr(student.get_submodule(module), attr, buffer.clone())
    return student.train(teacher.training)


def _renamed(key, prefix, position):
    """``key`` in the student (teacher layer t -> student layer position[t]); None if dropped."""
    if not key.startswith(prefix + "."):
        return key
    index, rest = key[len(prefix) + 1:].split(".", 1)
    if int(index) not in position:
        return None
    return f"{prefix}.{position[int(index)]}.{rest}"


def _student_config(teacher_config, chosen):
    config = copy.deepcopy(teacher_config)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and chosen != list(range(len(chosen))):
        # GPT-2 divides layer i's attention scores by i + 1: a layer moved to another depth changes
        raise ValueError(
            f"a GPT-2 teacher with scale_attn_by_inverse_layer_idx=True keeps its layers' math only with "
            f"layers [0, 1, ..., n-1], got {chosen}"
        )
    config.num_hidden_layers = len(chosen)  # GPT-2's attribute_map turns this into n_layer
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[t] for t in chosen]
    if getattr(config, "max_window_layers", None) is not None:
        # Qwen2/3: the first max_window_layers layers use full attention
        config.max_window_layers = sum(t < config.max_window_layers for t in chosen)
    return config


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


def auto_model_class(causal):
    """The Auto class that loads a causal-LM (``causal``) or masked-LM model directory."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if causal else AutoModelForMaskedLM


def save_student(student, path, tokenizer=None, state_dict=None):
    """Write ``student`` (and ``tokenizer`` if given) as a normal Hugging Face model directory.

    Equivalent of ``student.save_pretrained(path, state_dict=state_dict)`` (safetensors weights +
    config.json) and ``tokenizer.save_pretrained(path)``; ``AutoModelForMaskedLM.from_pretrained(path)``
    (causal students: ``AutoModelForCausalLM``) loads it. ``state_dict``: the weights to write instead of
    the module's own (a sharded student's, gathered whole).
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
    student.save_pretrained(path, state_dict=state_dict)
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


class HeadRows(nn.Module):
    """The first ``rows`` rows of an output projection, as an ``nn.Linear``-like module whose ``weight``
    (and ``bias``) are views of the head's, read at each call: no copy, and the gradient of the rows
    used reaches the head's parameter. Equivalent of ``F.linear(x, head.weight[:rows], head.bias[:rows])``,
    i.e. ``head(x)[..., :rows]``. Used when a teacher and a student pad one tokenizer's vocabulary to
    different sizes (Qwen2.5-7B's 152064 rows vs 0.5B's 151936): both heads are cut to the real vocabulary."""

    def __init__(self, head, rows):
        super().__init__()
        self.head = head
        self.rows = rows

    @property
    def weight(self):
        return self.head.weight[: self.rows]

    @property
    def bias(self):
        bias = getattr(self.head, "bias", None)
        return None if bias is None else bias[: self.rows]

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"rows={self.rows}"


class LMAdapter:
    """A model split into ``body``, ``transform`` and ``projection`` so that logits (or the rows the
    projection multiplies, for :func:`distil.fused_loss.linear_kl_ce_loss`) can be computed on selected
    rows only.  ``head(body(ids, mask))`` equals ``model(input_ids=ids, attention_mask=mask).logits``
    (``[..., :vocab_size]``), with ``head = projection ∘ transform`` (BERT: ``model.bert``, then
    ``cls.predictions.transform`` and ``cls.predictions.decoder``; RoBERTa: ``model.roberta``, then
    ``lm_head.dense`` -> GELU -> ``lm_head.layer_norm`` and ``lm_head.decoder``; DistilBERT:
    ``model.distilbert``, then ``vocab_transform`` -> activation -> ``vocab_layer_norm`` and
    ``vocab_projector``; decoders: ``model.transformer`` (GPT-2) or ``model.model``, whose output is
    already final-normed, then the identity and ``lm_head``). ``projection`` is
    ``model.get_output_embeddings()``, or its first ``vocab_size`` rows (:class:`HeadRows`); the logits are
    then transformed as the model's forward transforms them (:func:`logit_transform`: Gemma 2/3's soft cap).
    A causal body gets explicit ``position_ids`` (see :meth:`body`)."""

    def __init__(self, model, body_module, transform_fn, *, causal=False, vocab_size=None):
        self.model = model
        self._body_module = body_module
        self._transform_fn = transform_fn
        self.causal = causal
        head = model.get_output_embeddings()
        rows = head.weight.shape[0]
        if vocab_size is not None:
            check_int("vocab_size", vocab_size, 1, rows)
        self._projection = head if vocab_size in (None, rows) else HeadRows(head, vocab_size)
        self.logit_scale, self.logit_softcap = logit_transform(model.config)

    @property
    def projection(self):
        """The output projection ``[V, H]`` (with its bias, if any): an ``nn.Linear`` or :class:`HeadRows`."""
        return self._projection

    def body(self, input_ids, attention_mask):
        """Last hidden states ``[B, S, H]`` for int64 ``input_ids`` and ``attention_mask`` ``[B, S]``.
        A decoder's positions count the real tokens before each one (``cumsum(mask) - 1``, as
        ``generate`` forms them): ``0..n-1`` for right-padded rows and for packed blocks alike, and still
        right if a row were left-padded, where the model's default ``arange`` would not be."""
        check_token_batch(input_ids, attention_mask)
        extra = {}
        if self.causal:
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self._body_module(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def transform(self, hidden_rows):
        """The rows the projection multiplies, ``[..., H]``, for hidden states ``[..., H]``."""
        check_tensor("hidden_rows", hidden_rows)
        if hidden_rows.dim() == 0 or hidden_rows.shape[-1] != self.model.config.hidden_size:
            raise ValueError(
                f"hidden_rows must end in the hidden size {self.model.config.hidden_size}, "
                f"got shape {tuple(hidden_rows.shape)}"
            )
        return self._transform_fn(hidden_rows)

    def head(self, hidden_rows):
        """Vocabulary logits ``[..., V]`` for hidden states ``[..., H]`` (any leading shape): the projection's,
        times ``logit_scale``, soft-capped by ``logit_softcap`` (``reference.head_logits``)."""
        logits = self.projection(self.transform(hidden_rows))
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits


_CAUSAL = tuple(cls for cls in _LAYER_LISTS if cls not in (BertForMaskedLM, RobertaForMaskedLM))


def is_causal_lm(model):
    """Whether ``model`` is one of the causal-LM classes :func:`build_student` supports."""
    return isinstance(model, _CAUSAL)


def causal_lm_directory(name, path):
    """Whether the model directory ``path`` holds a causal LM: its config.json's architecture is an
    ``AutoModelForCausalLM`` class (e.g. GPT2LMHeadModel; BertForMaskedLM is not). Reads the config only,
    no weights; a missing config.json is a ValueError naming ``name`` (the flag or argument)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{name}: {Path(path) / 'config.json'} not found; {name} must be a Hugging Face "
                         "model directory")
    architectures = AutoConfig.from_pretrained(path, trust_remote_code=False).architectures or []
    return bool(architectures) and architectures[0] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def logit_transform(config):
    """``(logit_scale, logit_softcap)`` of a model's config: what its forward does to the projection's
    logits, as :func:`distil.fused_loss.linear_kl_ce_loss` takes it. Cohere multiplies them by
    ``config.logit_scale``; Gemma 2/3 soft-cap them, ``c · tanh(logits / c)`` with
    ``c = config.final_logit_softcapping`` (None: no cap); other models do neither, ``(1.0, None)``."""
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


def lm_adapter(model, vocab_size=None):
    """The :class:`LMAdapter` of a ``BertForMaskedLM``, ``RobertaForMaskedLM``, ``DistilBertForMaskedLM``
    or a causal LM :func:`build_student` supports; ``vocab_size`` cuts the projection to its first rows
    (the tokenizer's real vocabulary). The adapter's logits are the model's, soft cap included (Gemma 2/3's
    ``final_logit_softcapping``, :func:`logit_transform`)."""
    if isinstance(model, BertForMaskedLM):
        return LMAdapter(model, model.bert, model.cls.predictions.transform, vocab_size=vocab_size)
    if isinstance(model, RobertaForMaskedLM):
        head = model.lm_head
        return LMAdapter(model, model.roberta, lambda hidden: head.layer_norm(F.gelu(head.dense(hidden))),
                         vocab_size=vocab_size)
    if isinstance(model, DistilBertForMaskedLM):
        return LMAdapter(model, model.distilbert,
                         lambda hidden: model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))),
                         vocab_size=vocab_size)
    if is_causal_lm(model):
        body = model.transformer if isinstance(model, GPT2LMHeadModel) else model.model
        return LMAdapter(model, body, lambda hidden: hidden, causal=True, vocab_size=vocab_size)
    raise TypeError(
        "model must be a BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM or a causal LM "
        f"({', '.join(c.__name__ for c in _CAUSAL)}), got {type(model).__name__}"
    )
