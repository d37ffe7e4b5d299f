"""distil.evaluate (distil-eval): labelled-data readers, metrics against scikit-learn's definitions,
parameter counts, the held-out masked-LM and causal-LM scores (the latter against Hugging Face's own
loss), and the whole comparison on tiny models: masked LMs, and decoders (fine-tuned with a pad token
they lack, or scored on --lm-text alone with forward and generation throughput)."""
import importlib.util
import json

import pytest
import torch
from transformers import BertModel

from distil.evaluate import (
    EvalConfig,
    causal_lm_metrics,
    classification_metrics,
    count_parameters,
    evaluate,
    label_names,
    load_labelled,
    main,
    markdown_table,
    masked_lm_metrics,
)
from distil.student import build_student, save_student

from tiny import bert_tokenizer, corpus_lines, gpt2_tokenizer, tiny_bert, tiny_causal

CLASSES = ("neg", "neu", "pos")

NEEDS_DATASETS = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="distil-eval reads data with datasets (pip install -e '.[eval]')")



def _rows(n, seed=0):
    # the label is readable from the text (which of three words it holds), so fine-tuning can learn it
    marker = {"neg": "gradient", "neu": "matrix", "pos": "kernel"}
    lines = corpus_lines(n, seed=seed, max_words=12)
    return [(f"{line} {marker[CLASSES[i % 3]]}", CLASSES[i % 3]) for i, line in enumerate(lines)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows), encoding="utf-8")
    return path


def _write_csv(path, rows, delimiter=","):
    lines = [f"sentence{delimiter}y"] + [f'"{t}"{delimiter}{y}' for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and its half-depth student, as model directories with the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = bert_tokenizer()
    teacher = tiny_bert(len(tokenizer))
    save_student(teacher, root / "teacher", tokenizer)
    save_student(build_student(teacher), root / "student", tokenizer)
    encoder = BertModel(teacher.config)  # an encoder without a masked-LM head
    save_student(encoder, root / "encoder", tokenizer)
    gpt2_tok = gpt2_tokenizer()  # no pad token, as GPT-2's
    decoder = tiny_causal("gpt2", len(gpt2_tok), max_positions=64)
    save_student(decoder, root / "decoder", gpt2_tok)
    save_student(build_student(decoder), root / "decoder_student", gpt2_tok)
    return root


@NEEDS_DATASETS
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_load_labelled_files(tmp_path, suffix):
    rows = _rows(6)
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    else:
        _write_csv(path, rows, "\t" if suffix == ".tsv" else ",")
    ds = load_labelled(path, text_column="sentence", label_column="y")
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == [t for t, _ in rows] and ds["label"] == [y for _, y in rows]


@NEEDS_DATASETS
def test_load_labelled_dataset_on_disk(tmp_path):
    import datasets

    rows = _rows(8)
    part = {"sentence": [t for t, _ in rows], "y": [CLASSES.index(y) for _, y in rows]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(part)}).save_to_disk(tmp_path / "dd")
    ds = load_labelled(tmp_path / "dd", text_column="sentence", label_column="y", split="train")
    assert ds["label"] == part["y"]
    with pytest.raises(ValueError, match="split"):
        load_labelled(tmp_path / "dd", text_column="sentence", label_column="y")
    datasets.Dataset.from_dict(part).save_to_disk(tmp_path / "single")
    assert len(load_labelled(tmp_path / "single", text_column="sentence", label_column="y")) == 8


@NEEDS_DATASETS
def test_load_labelled_errors(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _rows(3))
    with pytest.raises(ValueError, match="column 'text'"):
        load_labelled(path)
    (tmp_path / "d.txt").write_text("x\n")
    with pytest.raises(ValueError, match="must end in"):
        load_labelled(tmp_path / "d.txt")
    with pytest.raises(ValueError, match="neither"):
        load_labelled(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="path"):
        load_labelled(3)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_labelled(tmp_path / "empty.jsonl")


@NEEDS_DATASETS
def test_label_names():
    import datasets

    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]})
    assert label_names(train, train) == ["0", "1"]
    with pytest.raises(ValueError, match=r"\['2'\]"):
        label_names(train, datasets.Dataset.from_dict({"text": ["d"], "label": [2]}))
    with pytest.raises(ValueError, match="two distinct"):
        label_names(datasets.Dataset.from_dict({"text": ["a"], "label": [0]}), train)


def test_classification_metrics_match_sklearn_definitions():
    predictions = [0, 1, 1, 2, 2, 2, 0, 1]
    references = [0, 1, 2, 2, 2, 0, 0, 0]
    m = classification_metrics(predictions, references, num_labels=4)  # class 3: absent, F1 counted as 0
    assert m["accuracy"] == pytest.approx(5 / 8)
    # per-class F1 by hand: class 0 P=2/2 R=2/4 -> 2/3; class 1 P=1/3 R=1/1 -> 1/2; class 2 P=2/3 R=2/3 -> 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3 + 0) / 4)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert m["macro_f1"] == pytest.approx(
        sklearn.f1_score(references, predictions, average="macro", labels=range(4), zero_division=0)
    )
    with pytest.raises(ValueError, match="1-D"):
        classification_metrics([0, 1], [0], num_labels=2)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [], num_labels=2)


def test_count_parameters_counts_tied_weights_once(models):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(models / "teacher")
    unique = {id(p): p.numel() for p in model.parameters()}
    total, non_embedding = count_parameters(model)
    assert total == sum(unique.values())
    embeddings = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert non_embedding == total - embeddings


def test_masked_lm_metrics(models, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("\n".join(corpus_lines(20, seed=5, min_words=15)) + "\n")
    first = masked_lm_metrics(models / "teacher", text, max_length=32, seed=3)
    assert first == masked_lm_metrics(models / "teacher", text, max_length=32, seed=3)  # fixed seed: same tokens
    assert first["masked_tokens"] > 0 and 0.0 <= first["accuracy"] <= 1.0 and first["loss"] > 0
    assert masked_lm_metrics(models / "encoder", text, max_length=32) is None  # no head: no score


@NEEDS_DATASETS
def test_evaluate_end_to_end(models, tmp_path, capsys):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(36, seed=1))
    test = _write_csv(tmp_path / "test.csv", _rows(12, seed=2))
    held = tmp_path / "held.txt"
    held.write_text("\n".join(corpus_lines(10, seed=7, min_words=15)) + "\n")
    out = tmp_path / "res" / "results.json"
    argv = [
        "--models", str(models / "teacher"), str(models / "student"), "--names", "T", "S",
        "--train", str(train), "--eval", str(test), "--text-column", "sentence", "--label-column", "y",
        "--seeds", "0", "1", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
        "--lm-text", str(held), "--lm-max-length", "32",
        "--throughput-sequences", "8", "--throughput-rounds", "2", "--output", str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    table = captured.out
    # one line per model on what its classifier added, not transformers' load report per model and seed
    assert [line.split(":")[1].strip() for line in captured.err.splitlines()
            if "classification head added" in line] == ["T", "S"]
    assert "UNEXPECTED" not in captured.err and "MISSING" not in captured.err
    header = table.splitlines()[0]
    for column in ("model", "params (M)", "accuracy % (mean ± std)", "macro-F1 %", "retention", "seq/s",
                   "speed-up", "MLM acc. %", "MLM loss"):
        assert f"| {column} |" in header
    results = json.loads(out.read_text())
    assert results["labels"] == list(CLASSES)
    assert [m["name"] for m in results["models"]] == ["T", "S"]
    teacher, student = results["models"]
    assert teacher["retention"] == 1.0 and teacher["speedup"] == 1.0
    assert [r["seed"] for r in student["runs"]] == [0, 1]
    accuracies = [r["accuracy"] for r in student["runs"]]
    assert student["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert student["accuracy"]["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)
    assert student["params"] < teacher["params"] and student["macro_f1"] is not None
    assert student["mlm"]["masked_tokens"] == teacher["mlm"]["masked_tokens"]  # same tokenizer, same positions
    assert student["throughput_seq_s"] > 0
    assert markdown_table(results).splitlines()[2].startswith("| T |")


@NEEDS_DATASETS
def test_same_seed_same_result(models, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(12, seed=1))
    config = EvalConfig(models=[str(models / "student")], train=str(train), eval=str(train), text_column="sentence",
                        label_column="y", seeds=[4], epochs=1.0, batch_size=4, max_length=32,
                        throughput_sequences=4, throughput_rounds=1)
    first, second = evaluate(config)["models"][0], evaluate(config)["models"][0]
    assert first["runs"][0]["accuracy"] == second["runs"][0]["accuracy"]
    assert first["macro_f1"] is not None  # 3 classes


def test_config_validation(models, tmp_path):
    base = dict(models=[str(models / "teacher")], train=str(tmp_path / "t.jsonl"))
    for change, message in [
        ({"models": [str(tmp_path / "nope")]}, "not a model directory"),
        ({"names": ["a", "b"]}, "names has 2"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"warmup": 1.0}, "warmup"),
        ({"mlm_prop": 0.0}, "mlm_prop"),
        ({"lm_text": str(tmp_path / "none.txt")}, "lm_text"),
        ({"train": None}, "train is required unless lm_text is given"),
        ({"train": None, "lm_text": __file__, "eval": __file__}, "given without train"),
        ({"generate_tokens": -1}, "generate_tokens must be an int >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            EvalConfig(**{**base, **change}).validate()


# ------------------------------------------------------------------ distil-eval takes nothing on trust
def _argv(models, train, *extra):
    return ["--models", str(models / "student"), "--train", str(train), "--text-column", "sentence",
            "--label-column", "y", "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
            "--throughput-sequences", "4", "--throughput-rounds", "1", *extra]


def _fails(capsys, argv, match):
    """distil-eval exits 1 with one line on stderr that matches."""
    import re

    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distil-eval: error: "), lines
    assert re.search(match, lines[0]), lines[0]


@NEEDS_DATASETS
def test_bad_inputs_exit_1_with_one_line_naming_flag_file_and_line(models, tmp_path, capsys):
    import shutil

    train = _write_jsonl(tmp_path / "train.jsonl", _rows(12, seed=1))
    test = _write_jsonl(tmp_path / "test.jsonl", _rows(6, seed=2))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(models / "student", no_tokenizer)
    for f in no_tokenizer.iterdir():
        if "token" in f.name or f.name in ("vocab.txt", "special_tokens_map.json"):
            f.unlink()
    _fails(capsys, ["--models", str(no_tokenizer), "--train", str(train), "--eval", str(test)],
           r"models: no tokenizer files in .*no_tokenizer")
    _fails(capsys, _argv(models, train), r"eval is required: --train .*train\.jsonl")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(train.read_text().splitlines()[0] + "\n\n{oops\n")
    _fails(capsys, _argv(models, train, "--eval", str(bad_json)), r"eval: .*bad\.jsonl:3: not valid JSON")
    null_label = tmp_path / "null.jsonl"
    null_label.write_text(json.dumps({"sentence": "a b", "y": "pos"}) + "\n" + json.dumps({"sentence": "c", "y": None}))
    _fails(capsys, _argv(models, null_label, "--eval", str(test)), r"train: .*null\.jsonl:2: empty 'y'")
    blank = tmp_path / "blank.csv"
    blank.write_text("sentence,y\na b,pos\nc d,\n")
    _fails(capsys, _argv(models, train, "--eval", str(blank)), r"eval: .*blank\.csv:3: empty 'y'")
    _fails(capsys, _argv(models, train, "--eval", str(test), "--label-column", "label"),
           r"train: .*train\.jsonl:1: no column 'label'")
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"sentence": f"w{i}", "y": "pos"}) + "\n" for i in range(4)))
    _fails(capsys, _argv(models, one_class, "--eval", str(test)), r"train .*one\.jsonl.*at least two distinct labels")
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text(json.dumps({"sentence": "x y", "y": "other"}) + "\n")
    _fails(capsys, _argv(models, train, "--eval", str(unseen)), r"evaluation labels \['other'\] do not occur")
    (tmp_path / "empty.jsonl").write_text("")
    _fails(capsys, _argv(models, train, "--eval", str(tmp_path / "empty.jsonl")), r"eval: .*empty\.jsonl has no rows")
    _fails(capsys, _argv(models, train, "--eval", str(tmp_path / "nowhere.jsonl")), r"eval: .*nowhere\.jsonl.* neither")


def test_flags_accumulate_and_help_explains_every_flag(capsys):
    from distil.evaluate import parse_args

    config = parse_args(["--models", "a", "--models", "b", "--train", "t", "--seeds", "0", "1", "--seeds", "2"])
    assert config.seeds == [0, 1, 2] and config.models == ["a", "b"]
    assert parse_args(["--models", "a", "--train", "t"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    import dataclasses

    for field in dataclasses.fields(EvalConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    helps = text.split("options:")[1].split("exit codes")[0]
    entries = [e for e in helps.split("\n  --")[1:]]
    assert len(entries) == len(dataclasses.fields(EvalConfig))
    for entry in entries:  # a one-line meaning each, and the default where there is one
        words = entry.split(None, 1)
        assert len(words) == 2 and len(words[1].split()) >= 3, entry
    assert "(default: 3.0)" in text and "(required)" in text
    assert "exit codes:" in text and "  1    error" in text


# ------------------------------------------------------------------ decoders
def _held_out(tmp_path, n=12):
    held = tmp_path / "held.txt"
    held.write_text("\n".join(corpus_lines(n, seed=7, min_words=15)) + "\n")
    return held


def test_causal_lm_metrics_are_hugging_faces_next_token_loss(models, tmp_path):
    """One batch holding every sequence: the loss is HF's ``model(..., labels=ids, -100 at padding).loss``
    (the shifted mean CE), the perplexity its exp, the accuracy the argmax's against the next token."""
    import math

    from transformers import AutoModelForCausalLM

    from distil.data import load_corpus
    from distil.evaluate.lm_metrics import padded_batches

    held = _held_out(tmp_path)
    scores = causal_lm_metrics(models / "decoder", held, max_length=32, batch_size=64)
    tok = gpt2_tokenizer()
    sequences = load_corpus([held], tok, max_length=32)
    (ids, mask), = padded_batches(sequences, 64, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(models / "decoder").eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    predicted = out.logits[:, :-1].argmax(-1)
    real_next = (mask[:, 1:] == 1)
    assert scores["tokens"] == int(real_next.sum()) == sum(len(s) - 1 for s in sequences)
    assert scores["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(float((predicted == ids[:, 1:])[real_next].float().mean()))
    # summed over tokens, not averaged per batch: the batching does not change it
    assert causal_lm_metrics(models / "decoder", held, max_length=32, batch_size=5)["loss"] == pytest.approx(
        scores["loss"], rel=1e-5)


def test_distil_eval_on_decoders_with_lm_text_alone(models, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--models", str(models / "decoder"), str(models / "decoder_student"), "--names", "T", "S",
            "--lm-text", str(_held_out(tmp_path)), "--lm-max-length", "32", "--generate-tokens", "4",
            "--throughput-batch-size", "4", "--throughput-sequences", "8", "--throughput-rounds", "2",
            "--output", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    for column in ("params (M)", "perplexity", "next-token acc. %", "forward tok/s", "forward speed-up",
                   "generate tok/s", "generate speed-up"):
        assert f"| {column} |" in header
    assert "accuracy % (mean ± std)" not in header and "MLM loss" not in header
    results = json.loads(out.read_text())
    teacher, student = results["models"]
    assert student["params"] < teacher["params"] and teacher["params_ratio"] == 1.0
    assert teacher["clm"]["tokens"] == student["clm"]["tokens"] > 0 and student["clm"]["perplexity"] > 1
    assert teacher["forward_speedup"] == teacher["generate_speedup"] == 1.0
    assert student["forward_tokens_s"] > 0 and student["generate_tokens_s"] > 0
    assert results["generate_prompts"] == 4 and 12 <= results["generate_prompt_tokens"] <= 16


@NEEDS_DATASETS
def test_a_decoder_without_a_pad_token_fine_tunes_as_a_classifier(models, tmp_path):
    from distil.evaluate.models import load_classifier, load_tokenizer

    tokenizer = load_tokenizer(models / "decoder")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    classifier = load_classifier(models / "decoder", list(CLASSES), tokenizer)
    assert classifier.config.pad_token_id == tokenizer.eos_token_id
    # The classifier reads each row's last real token: padding a row more does not change its logits.
    short = tokenizer(["the model"], return_tensors="pt")
    padded = tokenizer(["the model", "the model was a kernel of the paper"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(classifier(**short).logits[0], classifier(**padded).logits[0])
    train = _write_jsonl(tmp_path / "train.jsonl", _rows(24, seed=1))
    config = EvalConfig(models=[str(models / "decoder")], train=str(train), eval=str(train), text_column="sentence",
                        label_column="y", seeds=[0], epochs=1.0, batch_size=8, max_length=32,
                        lm_text=str(_held_out(tmp_path)), lm_max_length=32, generate_tokens=0,
                        throughput_sequences=4, throughput_rounds=1)
    result = evaluate(config)
    model = result["models"][0]
    assert 0.0 <= model["accuracy"]["mean"] <= 1.0 and model["throughput_seq_s"] > 0 and model["clm"]["tokens"] > 0
    assert "generate_tokens_s" not in model and "| perplexity |" in markdown_table(result)
