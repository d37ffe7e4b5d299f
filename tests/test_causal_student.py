"""distil.student for causal teachers (GPT-2, LLaMA, Qwen2/3, Mistral, Gemma2/3): layer copies, tied
embeddings, per-layer config fields, KV-cache layer indices, saving, loading with AutoModelForCausalLM and
generating.  Tiny random teachers built here (tiny.tiny_causal): nothing downloads."""
import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaConfig, LlamaModel

from distil.student import build_student, layer_map, save_student

import tiny
from helpers import relative_error

V = 96
FAMILIES = list(tiny.CAUSAL_FAMILIES)
F, S = "full_attention", "sliding_attention"
# the student's layer_types for teacher layers [0, 3] (the default map of 4 layers) and [1, 2]:
# written out from tiny.CAUSAL_FAMILIES' patterns, not computed the way build_student does
LAYER_TYPES = {
    "qwen2": {(0, 3): [F, S], (1, 2): [F, S]},  # teacher [F, F, S, S] (max_window_layers 2)
    "qwen3": {(0, 3): [F, S], (1, 2): [S, F]},  # teacher [F, S, F, S]
    "gemma2": {(0, 3): [S, F], (1, 2): [F, S]},  # teacher [S, F, S, F]
    "gemma3": {(0, 3): [S, S], (1, 2): [S, F]},  # teacher [S, S, F, S] (sliding_window_pattern 3)
}


def _layers(model):
    return model.transformer.h if isinstance(model, GPT2LMHeadModel) else model.model.layers


def _attention(layer):
    return layer.attn if hasattr(layer, "attn") else layer.self_attn


def _teacher_key(student_key, chosen):
    # student layer i was teacher layer chosen[i]; every other tensor keeps its name.
    return re.sub(r"^(transformer\.h|model\.layers)\.(\d+)\.",
                  lambda m: f"{m.group(1)}.{chosen[int(m.group(2))]}.", student_key)


def _batch(seed=0):
    # BOS ... EOS, right-padded; 12 tokens, longer than the sliding windows (4)
    return tiny.random_batch(V, 3, 12, cls_id=1, sep_id=2, pad_id=0, first_regular_id=3, seed=seed)


def _logits(model, ids, mask):
    # the non-pad positions only (a padded row's positions beyond its length are not compared)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]


def _generate(model, use_cache=True):
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers_kw", [{}, {"num_layers": 3}, {"layers": [3, 1]}])
def test_student_tensors_equal_the_teachers(family, layers_kw):
    teacher = tiny.tiny_causal(family, V)
    student = build_student(teacher, **layers_kw)
    chosen = layers_kw.get("layers") or layer_map(4, layers_kw.get("num_layers"))
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(_layers(student)) == len(chosen)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    kept = {k for k in t_state if not re.match(r"(transformer\.h|model\.layers)\.\d+\.", k)}
    assert kept <= set(s_state)  # embeddings, final norm and LM head
    assert len(s_state) == len(kept) + len(chosen) * (len(t_state) - len(kept)) // 4
    for key, value in s_state.items():
        assert torch.equal(value, t_state[_teacher_key(key, chosen)]), key
    emb, head = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == teacher.config.tie_word_embeddings
    # a copy, not a view: training the student leaves the teacher untouched
    with torch.no_grad():
        emb.add_(1.0)
    assert not torch.equal(emb, teacher.get_input_embeddings().weight)


def test_gpt2_student_takes_distilgpt2s_layers():
    teacher = tiny.tiny_causal("gpt2", V, layers=12)
    student = build_student(teacher)
    assert student.config.n_layer == student.config.num_hidden_layers == 6
    for i, t in enumerate([0, 2, 4, 7, 9, 11]):
        for (name, s), (_, p) in zip(student.transformer.h[i].named_parameters(),
                                     teacher.transformer.h[t].named_parameters()):
            assert torch.equal(s, p), (i, name)


# ---------------------------------------------------------------- per-layer fields and layer indices
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chosen", [[0, 3], [1, 2]])
def test_student_layers_keep_their_attention_kind_and_get_their_cache_slot(family, chosen):
    teacher = tiny.tiny_causal(family, V)
    student = build_student(teacher, layers=chosen)
    if family in LAYER_TYPES:
        assert student.config.layer_types == LAYER_TYPES[family][tuple(chosen)]
    else:
        assert getattr(student.config, "layer_types", None) is None
    if family == "qwen2":  # the first max_window_layers layers are the full-attention ones
        assert student.config.max_window_layers == 1
    for i, t in enumerate(chosen):
        s_attn, t_attn = _attention(_layers(student)[i]), _attention(_layers(teacher)[t])
        assert s_attn.layer_idx == i
        assert getattr(s_attn, "sliding_window", None) == getattr(t_attn, "sliding_window", None)
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is untouched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chosen", [[0, 3], [1, 2]])
def test_student_computes_the_teacher_with_only_the_chosen_layers(family, chosen):
    teacher = tiny.tiny_causal(family, V)
    student = build_student(teacher, layers=chosen)
    pruned = copy.deepcopy(teacher)
    body = pruned.transformer if family == "gpt2" else pruned.model
    if family == "gpt2":
        body.h = torch.nn.ModuleList(body.h[t] for t in chosen)
    else:
        body.layers = torch.nn.ModuleList(body.layers[t] for t in chosen)
    pruned.config.num_hidden_layers = len(chosen)
    if family in LAYER_TYPES:  # the masks follow config.layer_types; each layer keeps its own window
        pruned.config.layer_types = LAYER_TYPES[family][tuple(chosen)]
    ids, mask = _batch()
    ref, out = _logits(pruned, ids, mask), _logits(student, ids, mask)
    assert torch.equal(out, ref)
    assert relative_error(out, _logits(teacher, ids, mask)) > 1e-3  # the dropped layers mattered


@pytest.mark.parametrize("family", FAMILIES)
def test_student_of_every_layer_is_the_teacher(family):
    teacher = tiny.tiny_causal(family, V)
    student = build_student(teacher, layers=[0, 1, 2, 3])
    ids, mask = _batch()
    assert torch.equal(_logits(student, ids, mask), _logits(teacher, ids, mask))
    assert torch.equal(_generate(student), _generate(teacher))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_student_of_a_16_bit_teacher_keeps_its_fp32_buffers(family, tmp_path):
    # from_pretrained keeps the rotary frequencies (and Gemma's embedding scale) as they were computed;
    # a student cast to bfloat16 wholesale would round them and compute something else
    tiny.tiny_causal(family, V).save_pretrained(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, trust_remote_code=False)
    student = build_student(teacher, layers=[0, 1, 2, 3])
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    t_buffers = dict(teacher.named_buffers())
    assert any(b.dtype == torch.float32 for b in t_buffers.values())
    for name, buffer in student.named_buffers():
        assert buffer.dtype == t_buffers[name].dtype and torch.equal(buffer, t_buffers[name]), name
    ids, mask = _batch()
    assert torch.equal(_logits(student, ids, mask), _logits(teacher, ids, mask))


# ---------------------------------------------------------------- saving, loading, generating
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_student_loads_with_auto_model_for_causal_lm_and_generates(family, tmp_path):
    teacher = tiny.tiny_causal(family, V)
    student = build_student(teacher)
    path = save_student(student, tmp_path / "student")
    saved = json.loads((path / "config.json").read_text())
    assert "auto_map" not in saved  # nothing needs trust_remote_code
    assert saved["n_layer" if family == "gpt2" else "num_hidden_layers"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False).eval()
    assert type(loaded) is type(teacher)
    assert getattr(loaded.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    for name, value in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) == teacher.config.tie_word_embeddings
    ids, mask = _batch(seed=1)
    assert torch.equal(_logits(loaded, ids, mask), _logits(student, ids, mask))
    tokens = _generate(loaded)
    assert tokens.shape == (2, 12)
    # the KV cache (a slot per layer_idx, sliding for sliding layers) gives what recomputing gives
    assert torch.equal(tokens, _generate(loaded, use_cache=False))


# ---------------------------------------------------------------- validation
def test_build_student_refuses_unsupported_causal_models():
    model = LlamaModel(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2))
    with pytest.raises(ValueError, match=r"LlamaModel is not supported.*LlamaForCausalLM.*Gemma3ForCausalLM"):
        build_student(model)
    with pytest.raises(ValueError, match="BertForMaskedLM teacher"):
        build_student(tiny.tiny_causal("llama", V), as_distilbert=True)


def test_gpt2_layer_scaled_attention_needs_the_first_layers():
    teacher = tiny.tiny_causal("gpt2", V, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        build_student(teacher)
    # layers kept at their depth keep their scale
    student = build_student(teacher, layers=[0, 1])
    assert [_attention(layer).scaling for layer in student.transformer.h] == [
        _attention(layer).scaling for layer in teacher.transformer.h[:2]]
