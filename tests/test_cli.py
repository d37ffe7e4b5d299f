"""distil.cli (distil-train) as users run it: every flag parsed and documented, --help without heavy
imports, errors as one line with exit code 1, refused overwrite, SIGINT/SIGTERM checkpoint + exit code 3,
the end-to-end run (BERT, RoBERTa, DistilBERT students), teacher and data checks that name the file."""
import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertModel

from distil.checkpoint import TRAINING_STATE
from distil.cli import EXIT_DIVERGED, EXIT_ERROR, EXIT_INTERRUPTED, TrainConfig, main, parse_args
from distil.train import METRICS, STUDENT, checkpoints

from helpers import one_error_line
from tiny import bert_tokenizer, roberta_tokenizer, tiny_bert, tiny_roberta, write_corpus


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A BERT and a RoBERTa teacher directory (safetensors + tokenizer) and a 2-file corpus."""
    root = tmp_path_factory.mktemp("cli")
    for name, tok, build in (("bert", bert_tokenizer(), tiny_bert), ("roberta", roberta_tokenizer(), tiny_roberta)):
        build(len(tok)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_corpus(root / "corpus", n_files=2, n_lines=100)
    return root


def argv(workdir, out, teacher="bert", *flags):
    return ["--teacher", str(workdir / teacher), "--data", str(workdir / "corpus"), "--output-dir", str(workdir / out),
            "--batch-size", "16", "--grad-accum", "1", "--max-length", "64", "--max-steps", "2", "--log-every", "1",
            "--no-progress", *flags]


def train_rows(path):
    return [r for r in map(json.loads, (path / METRICS).read_text().splitlines()) if "loss" in r]


# ------------------------------------------------------------------ flags
# One non-default value per TrainConfig field: a field without a value here fails the test, so every new
# flag is covered.
NON_DEFAULT_FLAGS = {
    "teacher": "t", "data": ["a.txt", "b"], "output_dir": "o", "overwrite_output_dir": True, "student": "s",
    "teacher_cache": "c",
    "student_layers": 3, "as_distilbert": True, "max_length": 128, "batch_size": 7, "grad_accum": 3, "epochs": 2,
    "max_steps": 9, "lr": 1e-3, "weight_decay": 0.01, "warmup": 0.1, "adam_eps": 1e-8, "max_grad_norm": 1.0,
    "alpha_kl": 0.5, "alpha_mlm": 0.25, "alpha_clm": 0.75, "alpha_cos": 0.0, "temperature": 4.0,
    "divergence": "jsd", "jsd_beta": 0.3, "skew_alpha": 0.2,
    "restrict_kl_to_mask": True,
    "fused_head": False, "block_size": 256, "mask_prop": 0.2, "word_mask": 0.7, "word_keep": 0.2,
    "word_rand": 0.1 + 1e-9, "smoothing": 0.5, "fsdp": True, "seed": 3,
    "precision": "fp32", "save_every": 11, "save_total_limit": 2, "resume": True, "log_every": 5,
    "report_to": "tensorboard", "eval_fraction": 0.05, "eval_max_sequences": 10, "eval_every": 3, "progress": False,
}


def test_parse_args_maps_every_flag():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(NON_DEFAULT_FLAGS) == set(fields)
    args = []
    for name, value in NON_DEFAULT_FLAGS.items():
        assert value != fields[name].default, name
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        else:
            args += [flag, *map(str, value if isinstance(value, list) else [value])]
    assert dataclasses.asdict(parse_args(args)) == NON_DEFAULT_FLAGS
    defaults = parse_args(["--teacher", "t", "--data", "d", "--output-dir", "o"])
    assert dataclasses.asdict(defaults) == {**{n: f.default for n, f in fields.items()},
                                            "teacher": "t", "data": ["d"], "output_dir": "o"}


def test_help_documents_every_flag_with_its_default_exit_codes_and_layout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = ("--no-" if field.default is True else "--") + field.name.replace("_", "-")
        assert flag in text, flag
        if field.default not in (dataclasses.MISSING, None) and not isinstance(field.default, bool):
            assert f"(default: {field.default})" in text, field.name
    for item in ("exit codes", "checkpoint-<step>/", "metrics.jsonl", "interrupted"):
        assert item in text


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom distil.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = sorted({'torch', 'transformers', 'triton'} & set(sys.modules))\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_is_imported_by_nothing_in_the_package():
    # distil.cli imports config and train; a module importing it back would be a cycle.
    package = Path(__file__).resolve().parent.parent / "distil"
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        assert path.name == "cli.py" or "distil.cli" not in imported, path.name


@pytest.mark.parametrize("field, value, error, match", [
    ("batch_size", 0, ValueError, "batch_size"),
    ("grad_accum", 1.5, TypeError, "grad_accum"),
    ("lr", -1.0, ValueError, "lr"),
    ("lr", "big", TypeError, "lr"),
    ("warmup", 1.0, ValueError, "warmup"),
    ("precision", "fp8", ValueError, "precision"),
    ("teacher", "/nonexistent", ValueError, "teacher"),
    ("max_steps", -1, ValueError, "max_steps"),
    ("temperature", 0.0, ValueError, "temperature"),
    ("temperature", float("nan"), ValueError, "temperature"),
    ("eval_fraction", 1.0, ValueError, "eval_fraction"),
    ("save_total_limit", 0, ValueError, "save_total_limit"),
    ("report_to", "wandb", ValueError, "report_to"),
    ("alpha_mlm", 0.0, ValueError, "all 0"),
])
def test_config_validation_names_the_argument(workdir, field, value, error, match):
    base = dict(teacher=str(workdir / "bert"), data=["d"], output_dir="o", alpha_kl=0.0, alpha_cos=0.0)
    with pytest.raises(error, match=match):
        TrainConfig(**{**base, field: value}).validate()


# ------------------------------------------------------------------ errors: one line, exit 1, naming the thing
def test_bad_value_is_one_line_before_the_teacher_loads(workdir, capsys):
    assert main(argv(workdir, "bad_t", "bert", "--temperature", "0")) == EXIT_ERROR
    one_error_line(capsys, "temperature")
    assert not (workdir / "bad_t").exists()


@pytest.mark.parametrize("flags, message", [
    # The library's own messages (distil.checks), which used to come only after the models had loaded.
    (("--temperature", "1e19"), "temperature must be in [2**-126, 2**63)"),
    (("--seed", "-1"), "seed must be an int >= 0"),
    (("--max-length", "2"), "max_length must be an int >= 3"),
    (("--mask-prop", "0"), "mask_prop must be in (0, 1]"),
    (("--word-mask", "0.5"), "word_mask + word_keep + word_rand must be 1"),
    (("--smoothing", "-1"), "smoothing must be finite in float32 and >= 0"),
    (("--student-layers", "5"), "student_layers must be an int in [1, 4]"),
    (("--divergence", "jsd", "--jsd-beta", "1.5"), "jsd_beta must be in [0, 1]"),
    (("--divergence", "skew_kl", "--skew-alpha", "1"), "skew_alpha must be in [0, 1)"),
    (("--divergence", "tvd", "--jsd-beta", "0.5"), "jsd_beta is a parameter of divergence jsd, not of tvd"),
    (("--skew-alpha", "0.1"), "skew_alpha is a parameter of divergence skew_kl / skew_reverse_kl"),
    (("--data", "/nonexistent"), "data path '/nonexistent' is neither a file nor a folder"),
])
def test_library_range_errors_come_before_any_model_loads(workdir, capsys, monkeypatch, flags, message):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", no_load)
    assert main(argv(workdir, "fail_fast", "bert", *flags)) == EXIT_ERROR
    one_error_line(capsys, message)
    assert not (workdir / "fail_fast").exists()


def test_non_empty_output_dir_is_refused_unless_resume_or_overwrite(workdir, capsys):
    assert main(argv(workdir, "twice")) == 0
    first = (workdir / "twice" / STUDENT / "model.safetensors").read_bytes()
    assert main(argv(workdir, "twice", "bert", "--seed", "1")) == EXIT_ERROR
    one_error_line(capsys, "not empty", "--resume", "--overwrite-output-dir")
    assert (workdir / "twice" / STUDENT / "model.safetensors").read_bytes() == first
    assert main(argv(workdir, "twice", "bert", "--seed", "1", "--overwrite-output-dir")) == 0
    assert [r["step"] for r in train_rows(workdir / "twice")] == [1, 2]  # one run's rows, not two
    assert (workdir / "twice" / STUDENT / "model.safetensors").read_bytes() != first


def test_teacher_without_tokenizer_files_is_named(workdir, tmp_path, capsys):
    tiny_bert(len(bert_tokenizer())).save_pretrained(tmp_path / "no_tok")
    assert main(argv(workdir, tmp_path / "out", str(tmp_path / "no_tok"))) == EXIT_ERROR
    one_error_line(capsys, "no tokenizer files", str(tmp_path / "no_tok"))


def test_teacher_without_mlm_head_is_named(workdir, tmp_path, capsys):
    tok = bert_tokenizer()
    BertModel(tiny_bert(len(tok)).config).save_pretrained(tmp_path / "encoder")
    tok.save_pretrained(tmp_path / "encoder")
    assert main(argv(workdir, tmp_path / "out", str(tmp_path / "encoder"))) == EXIT_ERROR
    one_error_line(capsys, str(tmp_path / "encoder" / "model.safetensors"), "masked-LM head")


def test_teacher_without_safetensors_is_named(workdir, tmp_path, capsys):
    tok = bert_tokenizer()
    model = tiny_bert(len(tok))
    model.save_pretrained(tmp_path / "bin")
    tok.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # an old pickle checkpoint only
    assert main(argv(workdir, tmp_path / "out", str(tmp_path / "bin"))) == EXIT_ERROR
    one_error_line(capsys, str(tmp_path / "bin" / "model.safetensors"), "pytorch_model.bin")


def test_non_utf8_data_file_is_named(workdir, tmp_path, capsys):
    data = tmp_path / "data"
    write_corpus(data, n_files=1)
    (data / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    args = argv(workdir, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == EXIT_ERROR
    one_error_line(capsys, str(data / "latin1.txt"), "UTF-8")


def test_resume_with_a_changed_flag_is_one_line_naming_it(workdir, capsys):
    assert main(argv(workdir, "changed")) == 0
    assert main(argv(workdir, "changed", "bert", "--resume", "--max-steps", "5")) == EXIT_ERROR
    one_error_line(capsys, "--max-steps is 5", "checkpoint-2")


# ------------------------------------------------------------------ runs
@pytest.mark.parametrize("teacher, flags", [("bert", ["--restrict-kl-to-mask", "--as-distilbert"]),
                                            ("roberta", ["--no-fused-head"])])
def test_cli_end_to_end_gives_a_student_that_transformers_loads(workdir, teacher, flags, capsys):
    out = workdir / f"cli_{teacher}"
    assert main(argv(workdir, out.name, teacher, *flags)) == 0
    err = capsys.readouterr().err
    assert "step 2/2 | loss" in err and "eval_mlm" in err  # --no-progress: metrics as lines
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"loss", "kl", "mlm", "cos", "lr", "grad_norm", "tokens", "tokens_per_s"}
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["kl"], r["mlm"], r["cos"]])))
        assert r["loss"] == pytest.approx(5.0 * r["kl"] + 2.0 * r["mlm"] + 1.0 * r["cos"], rel=1e-5)
    for directory in (out / STUDENT, out / "checkpoint-2"):
        student = AutoModelForMaskedLM.from_pretrained(directory)
        expected = "DistilBertForMaskedLM" if "--as-distilbert" in flags else "RobertaForMaskedLM"
        assert type(student).__name__ == expected
        layers = student.config.n_layers if expected.startswith("DistilBert") else student.config.num_hidden_layers
        assert layers == 2


def test_divergence_flag_replaces_the_kl_and_nothing_else(workdir):
    """--divergence jsd: the first step's logged kl is T² times the generalised JSD (bounded by T²·H(β), H
    the binary entropy, where the forward KL is not) and differs from the default run's; the MLM loss of the
    same batch and student is the same."""
    import math

    firsts = {}
    for name, flags in (("fkl", ()), ("jsd", ("--divergence", "jsd", "--jsd-beta", "0.3"))):
        out = workdir / f"div_{name}"
        assert main(argv(workdir, out.name, "bert", "--max-steps", "1", "--eval-fraction", "0", *flags)) == 0
        firsts[name] = train_rows(out)[0]
    fkl, jsd = firsts["fkl"], firsts["jsd"]
    assert jsd["mlm"] == pytest.approx(fkl["mlm"], rel=1e-6) and jsd["cos"] == pytest.approx(fkl["cos"], rel=1e-6)
    assert 0 < jsd["kl"] <= 4.0 * -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    assert abs(jsd["kl"] - fkl["kl"]) > 1e-3 * fkl["kl"]
    assert jsd["loss"] == pytest.approx(5.0 * jsd["kl"] + 2.0 * jsd["mlm"] + 1.0 * jsd["cos"], rel=1e-5)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_exits_with_the_interrupted_code(workdir, signum):
    out = workdir / f"signal_{signum.name}"
    cmd = [sys.executable, "-m", "distil.cli", *argv(workdir, out.name), "--max-steps", "100000",
           "--save-every", "100000", "--eval-every", "100000", "--batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / METRICS).is_file() or not (out / METRICS).read_text():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    ((step, path),) = checkpoints(out)
    assert step == train_rows(out)[-1]["step"] >= 1
    assert torch.load(path / TRAINING_STATE, weights_only=True)["step"] == step
    AutoModelForMaskedLM.from_pretrained(path)  # the interrupted run's student loads
    assert not (out / STUDENT).exists()  # interrupted, not finished


def test_divergence_exits_with_its_own_code(workdir, capsys):
    # A learning rate so large that the parameters overflow the norm after the first update.
    assert main(argv(workdir, "diverge", "bert", "--lr", "1e30", "--warmup", "0")) == EXIT_DIVERGED
    one_error_line(capsys, "not finite", "No checkpoint was written yet")
    assert not checkpoints(workdir / "diverge")


def test_a_shadowing_source_checkout_is_named(tmp_path):
    # A copy of the package's Python files without its own build, imported from the current folder.
    import distil

    shutil.copytree(Path(distil.__file__).parent, tmp_path / "distil",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import distil.fused_loss"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "shadows the installed distil" in proc.stderr and str(tmp_path / "distil") in proc.stderr
