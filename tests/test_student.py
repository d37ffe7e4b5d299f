"""distil.student: layer map, student construction (BERT, RoBERTa, DistilBERT export), saving and
loading with AutoModelForMaskedLM, and the body/head adapters."""
import copy
import re

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, DistilBertForMaskedLM

from distil.student import build_student, layer_map, lm_adapter, save_student

import tiny
from helpers import relative_error

V = 120


def _teacher(arch, vocab_size=V):
    return tiny.tiny_bert(vocab_size) if arch == "bert" else tiny.tiny_roberta(vocab_size)


def _batch(arch, seed=0, vocab_size=V):
    cls_id, sep_id, pad_id = (2, 3, 0) if arch == "bert" else (0, 2, 1)
    return tiny.random_batch(vocab_size, 3, 12, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, seed=seed)


def _logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


# ---------------------------------------------------------------- layer_map
def test_layer_map_is_the_papers_for_12_to_6():
    assert layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert layer_map(12) == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize("teacher_layers", [1, 2, 3, 4, 5, 6, 8, 12, 24, 25])
def test_layer_map_spreads_evenly_keeping_first_and_last(teacher_layers):
    assert len(layer_map(teacher_layers)) == max(1, teacher_layers // 2)
    for n in range(1, teacher_layers + 1):
        m = layer_map(teacher_layers, n)
        assert len(m) == n and m[0] == 0
        assert all(b > a for a, b in zip(m, m[1:])), m
        if n > 1:
            assert m[-1] == teacher_layers - 1
            exact = [i * (teacher_layers - 1) / (n - 1) for i in range(n)]
            assert all(abs(a - b) <= 0.5 for a, b in zip(m, exact)), (m, exact)
    assert layer_map(teacher_layers, teacher_layers) == list(range(teacher_layers))


def test_layer_map_validates():
    with pytest.raises(ValueError, match="student_layers"):
        layer_map(12, 13)
    with pytest.raises(ValueError, match="student_layers"):
        layer_map(12, 0)
    with pytest.raises(ValueError, match="teacher_layers"):
        layer_map(0)
    with pytest.raises(TypeError, match="teacher_layers"):
        layer_map(12.0)
    with pytest.raises(TypeError, match="student_layers"):
        layer_map(12, True)


# ---------------------------------------------------------------- build_student
def _teacher_key(student_key, chosen):
    # student layer i was teacher layer chosen[i]; every other tensor keeps its name.
    return re.sub(r"\.encoder\.layer\.(\d+)\.", lambda m: f".encoder.layer.{chosen[int(m.group(1))]}.", student_key)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("layers_kw", [{}, {"num_layers": 3}, {"layers": [3, 1]}])
def test_student_tensors_equal_the_teachers(arch, layers_kw):
    teacher = _teacher(arch)
    student = build_student(teacher, **layers_kw)
    chosen = layers_kw.get("layers") or layer_map(4, layers_kw.get("num_layers"))
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(chosen)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        assert torch.equal(value, t_state[_teacher_key(key, chosen)]), key
    # embeddings and the whole head are among them, and the decoder stays tied to the embeddings
    prefix = "bert" if arch == "bert" else "roberta"
    head = "cls.predictions.transform.dense.weight" if arch == "bert" else "lm_head.dense.weight"
    for key in (f"{prefix}.embeddings.word_embeddings.weight", f"{prefix}.embeddings.position_embeddings.weight",
                f"{prefix}.embeddings.token_type_embeddings.weight", f"{prefix}.embeddings.LayerNorm.weight", head):
        assert key in s_state
    emb = student.get_input_embeddings().weight
    assert student.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    # a copy, not a view: training the student leaves the teacher untouched
    with torch.no_grad():
        emb.add_(1.0)
    assert not torch.equal(emb, teacher.get_input_embeddings().weight)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_student_computes_the_teacher_with_only_the_chosen_layers(arch):
    teacher = _teacher(arch).double()
    student = build_student(teacher)
    pruned = copy.deepcopy(teacher)
    body = pruned.bert if arch == "bert" else pruned.roberta
    body.encoder.layer = torch.nn.ModuleList(body.encoder.layer[t] for t in layer_map(4))
    ids, mask = _batch(arch)
    ref, out = _logits(pruned, ids, mask), _logits(student, ids, mask)
    assert relative_error(out, ref) <= 1e-12
    assert relative_error(out, _logits(teacher, ids, mask)) > 1e-3  # the dropped layers mattered


def test_student_follows_teacher_dtype_and_mode():
    teacher = tiny.tiny_bert(V).to(torch.bfloat16).train()
    student = build_student(teacher)
    assert student.training
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


def test_build_student_validates():
    teacher = tiny.tiny_bert(V)
    with pytest.raises(TypeError, match="teacher"):
        build_student(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_layers or layers"):
        build_student(teacher, num_layers=2, layers=[0, 1])
    with pytest.raises(ValueError, match=r"layers\[1\]"):
        build_student(teacher, layers=[0, 4])
    with pytest.raises(ValueError, match="repeat"):
        build_student(teacher, layers=[1, 1])
    with pytest.raises(TypeError, match="layers"):
        build_student(teacher, layers=[])
    with pytest.raises(ValueError, match="num_layers|student_layers"):
        build_student(teacher, num_layers=5)
    with pytest.raises(TypeError, match="as_distilbert"):
        build_student(teacher, as_distilbert=1)
    with pytest.raises(ValueError, match="BertForMaskedLM teacher"):
        build_student(tiny.tiny_roberta(V), as_distilbert=True)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        build_student(tiny.tiny_bert(V, layer_norm_eps=1e-5), as_distilbert=True)


# ---------------------------------------------------------------- DistilBERT export
def test_distilbert_export_gives_the_bert_students_logits():
    teacher = tiny.tiny_bert(V).double()
    bert_student = build_student(teacher)
    distil_student = build_student(teacher, as_distilbert=True)
    assert type(distil_student) is DistilBertForMaskedLM
    assert distil_student.config.n_layers == 2 and distil_student.config.dim == 32
    ids, mask = _batch("bert")
    ref = _logits(bert_student, ids, mask)
    assert relative_error(_logits(distil_student, ids, mask), ref) <= 1e-12
    # DistilBERT has no token types: equality holds for token_type_ids == 0 only (documented)
    other_type = _logits(bert_student, ids, mask, token_type_ids=torch.ones_like(ids))
    assert relative_error(_logits(distil_student, ids, mask), other_type) > 1e-3
    # the copied tensors
    sd = distil_student.state_dict()
    assert torch.equal(sd["distilbert.transformer.layer.1.attention.q_lin.weight"],
                       teacher.bert.encoder.layer[3].attention.self.query.weight)
    assert torch.equal(sd["distilbert.transformer.layer.0.ffn.lin2.bias"],
                       teacher.bert.encoder.layer[0].output.dense.bias)
    assert torch.equal(sd["vocab_transform.weight"], teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(sd["vocab_projector.bias"], teacher.cls.predictions.bias)
    assert torch.equal(sd["distilbert.embeddings.position_embeddings.weight"],
                       teacher.bert.embeddings.position_embeddings.weight
                       + teacher.bert.embeddings.token_type_embeddings.weight[0])


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch,as_distilbert", [("bert", False), ("roberta", False), ("bert", True)])
def test_saved_student_loads_with_automodel_and_gives_same_logits(tmp_path, arch, as_distilbert):
    tokenizer = tiny.bert_tokenizer() if arch == "bert" else tiny.roberta_tokenizer()
    vocab_size = len(tokenizer)
    student = build_student(_teacher(arch, vocab_size), as_distilbert=as_distilbert)
    out = save_student(student, tmp_path / "student", tokenizer)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.bin"))
    loaded = AutoModelForMaskedLM.from_pretrained(out)
    assert type(loaded) is type(student) and not loaded.training
    ids, mask = _batch(arch, vocab_size=vocab_size)
    assert torch.equal(_logits(loaded, ids, mask), _logits(student, ids, mask))
    text = tiny.corpus_lines(3, seed=5)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_save_student_validates(tmp_path):
    student = build_student(tiny.tiny_bert(V))
    with pytest.raises(TypeError, match="student"):
        save_student(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(TypeError, match="path"):
        save_student(student, 3)
    with pytest.raises(TypeError, match="tokenizer"):
        save_student(student, tmp_path, tokenizer="bert-base-uncased")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_student(student, tmp_path / "file")


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_adapter_body_then_head_is_the_models_forward(kind):
    teacher = _teacher("roberta" if kind == "roberta" else "bert")
    model = build_student(teacher, as_distilbert=True) if kind == "distilbert" else teacher
    adapter = lm_adapter(model)
    ids, mask = _batch("roberta" if kind == "roberta" else "bert", seed=3)
    ref = _logits(model, ids, mask)
    with torch.no_grad():
        hidden = adapter.body(ids, mask)
        assert hidden.shape == (*ids.shape, 32)
        assert torch.equal(adapter.head(hidden), ref)
        rows = mask.bool()
        assert relative_error(adapter.head(hidden[rows]), ref[rows]) <= 1e-6  # head on selected rows only


def test_adapter_gradients_reach_the_model():
    model = build_student(tiny.tiny_bert(V)).train()
    adapter = lm_adapter(model)
    ids, mask = _batch("bert")
    adapter.head(adapter.body(ids, mask)[mask.bool()]).square().mean().backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.cls.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_adapter_validates():
    with pytest.raises(TypeError, match="model"):
        lm_adapter(torch.nn.Linear(2, 2))
    adapter = lm_adapter(tiny.tiny_bert(V))
    ids, mask = _batch("bert")
    with pytest.raises(TypeError, match="input_ids"):
        adapter.body(ids.int(), mask)
    with pytest.raises(ValueError, match="attention_mask"):
        adapter.body(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="hidden_rows"):
        adapter.head(torch.zeros(4, 31))
