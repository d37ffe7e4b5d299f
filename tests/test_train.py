"""distil.train: the fused-path step against distiller.py's eager step (float64), bit-exact resume,
atomic checkpoints, NaN stop, SIGTERM, the CLI end to end (BERT, RoBERTa, DistilBERT students)."""
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForMaskedLM

from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker
from distil.student import build_student
from distil.cli import TrainConfig, main, parse_args
from distil.step import DistillationStep, StudentRows
from distil.train import CHECKPOINT, METRICS, NonFiniteLossError, Trainer
from tiny import bert_tokenizer, random_batch, roberta_tokenizer, tiny_bert, tiny_roberta, write_corpus

from helpers import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import eager_loss  # noqa: E402  (distiller.py's step, shared with the benchmark)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A BERT and a RoBERTa teacher directory (safetensors + tokenizer) and a 2-file corpus."""
    root = tmp_path_factory.mktemp("train")
    for name, tok, build in (("bert", bert_tokenizer(), tiny_bert), ("roberta", roberta_tokenizer(), tiny_roberta)):
        model = build(len(tok))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_corpus(root / "corpus", n_files=2, n_lines=100)
    return root


def config(workdir, out, teacher="bert", **kw):
    base = dict(teacher=str(workdir / teacher), data=[str(workdir / "corpus")], output_dir=str(workdir / out),
                batch_size=32, grad_accum=2, max_length=64, max_steps=4, save_every=100, log_every=1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def metrics(workdir, out):
    return [json.loads(line) for line in (workdir / out / METRICS).read_text().splitlines()]


# ------------------------------------------------------------------ the step itself
@pytest.mark.parametrize("as_distilbert", [False, True])
@pytest.mark.parametrize("restrict", [False, True])
def test_step_matches_distiller_eager_step_in_float64(restrict, as_distilbert):
    tok = bert_tokenizer()
    vocab = len(tok)
    teacher = tiny_bert(vocab, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(teacher, as_distilbert=as_distilbert).train()
    ref_student = copy.deepcopy(student).double()
    with torch.no_grad():  # a peaked teacher far from the student: the KL is O(1), not a rounding residue
        teacher.cls.predictions.bias.copy_(3.0 * torch.randn(vocab))
    ids, attn = random_batch(vocab, 6, 24, cls_id=2, sep_id=3, pad_id=0, seed=1)
    masked, labels = MLMMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_id=4)(ids, attn, torch.Generator().manual_seed(3))
    assert (labels != -100).sum() > 0 and (attn == 0).sum() > 0  # both row kinds are exercised

    ref = eager_loss(ref_student, copy.deepcopy(teacher).double(), masked, attn, labels, restrict_kl_to_mask=restrict)
    ref[0].backward()

    loss_fn = DistillationLoss()
    out = DistillationStep(StudentRows(student), teacher, loss_fn, restrict_kl_to_mask=restrict)(masked, attn, labels)
    out.total.backward()
    assert ref[1] > 0.1
    for got, want in zip((out.total, out.kl, out.mlm, out.cos), ref):
        assert relative_error(got, want) <= 1e-5
    ours = dict(student.named_parameters())
    pairs = [(ours[name].grad, p.grad) for name, p in ref_student.named_parameters()]
    assert all(g is not None for g, _ in pairs)
    assert relative_error(torch.cat([g.flatten() for g, _ in pairs]), torch.cat([r.flatten() for _, r in pairs])) <= 1e-5
    scale = max(r.norm() for _, r in pairs)
    for name, (g, r) in zip(ours, pairs):
        if r.norm() > 1e-4 * scale:  # attention key biases have an exactly-zero gradient: only rounding noise
            assert relative_error(g, r) <= 1e-4, name


# ------------------------------------------------------------------ resume, checkpoints, NaN
def test_resume_is_bit_exact_across_an_epoch_boundary(workdir):
    # Dropout is on (tiny teachers keep BERT's 0.1), so this also checks that RNG states travel.
    straight = Trainer(config(workdir, "straight"))
    assert len(straight.batches) < 4  # 4 steps cross an epoch boundary
    before = {k: v.clone() for k, v in straight.student.state_dict().items()}
    assert straight.fit() == "done"

    first = Trainer(config(workdir, "split"))
    assert first.fit(max_steps=2) == "done"
    ckpt = torch.load(workdir / "split" / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 2
    assert not list((workdir / "split").glob("*.tmp"))
    resumed = Trainer(config(workdir, "split", resume=True))
    resumed.fit()
    assert resumed.step == 4

    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    assert [m["loss"] for m in metrics(workdir, "straight")] == [m["loss"] for m in metrics(workdir, "split")]
    # the finished run wrote a student that transformers loads, with the trained weights
    loaded = AutoModelForMaskedLM.from_pretrained(workdir / "split" / "student")
    assert all(torch.equal(v, b[k]) for k, v in loaded.state_dict().items())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir):
    trainer = Trainer(config(workdir, "nan", save_every=1))
    trainer.fit(max_steps=1)
    good = (workdir / "nan" / CHECKPOINT).read_bytes()
    with torch.no_grad():
        next(trainer.student.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="not finite at step 2"):
        trainer.fit(max_steps=3)
    assert (workdir / "nan" / CHECKPOINT).read_bytes() == good
    ckpt = torch.load(workdir / "nan" / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


class _BackwardRewrites(TorchDispatchMode):
    """Counts the loss ops' backward calls and those that changed the gradient buffer the forward wrote."""

    OPS = (torch.ops.distil.kl_ce_rows_backward.default, torch.ops.distil.cosine_rows_backward.default)

    def __init__(self):
        super().__init__()
        self.calls = self.changed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = args[0].clone() if func in self.OPS else None
        out = func(*args, **(kwargs or {}))
        if before is not None:
            self.calls += 1
            self.changed += not torch.equal(before, args[0])
        return out


def test_train_step_announces_its_backward_factor(workdir):
    """The trainer announces grad_accum's 1/3 (and GradScaler's scale on fp16 runs) to the loss: the
    gradient is written for exactly that factor, so the backward rewrites no gradient row."""
    trainer = Trainer(config(workdir, "announce", grad_accum=3))
    with _BackwardRewrites() as mode:
        trainer.train_step()
    assert mode.calls > 0 and mode.changed == 0


def test_resume_refuses_a_missing_checkpoint(workdir):
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(config(workdir, "empty", resume=True)).fit()


# ------------------------------------------------------------------ CLI
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(workdir):
    out = workdir / "sigterm"
    cmd = [sys.executable, "-m", "distil.train", "--teacher", str(workdir / "bert"), "--data", str(workdir / "corpus"),
           "--output-dir", str(out), "--batch-size", "4", "--grad-accum", "1", "--max-length", "64",
           "--max-steps", "100000", "--save-every", "100000", "--log-every", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (out / METRICS).is_file() or not (out / METRICS).read_text():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no training step within 90 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted" in err
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == metrics(workdir, "sigterm")[-1]["step"] >= 1
    assert not (out / "student").exists()  # interrupted, not finished


@pytest.mark.parametrize("teacher, flags", [("bert", ["--restrict-kl-to-mask", "--as-distilbert"]), ("roberta", [])])
def test_cli_end_to_end_gives_a_student_that_transformers_loads(workdir, teacher, flags):
    out = workdir / f"cli_{teacher}"
    argv = ["--teacher", str(workdir / teacher), "--data", str(workdir / "corpus"), "--output-dir", str(out),
            "--batch-size", "16", "--grad-accum", "1", "--max-length", "64", "--max-steps", "2", "--log-every", "1", "--no-progress", *flags]
    assert main(argv) == 0
    rows = metrics(workdir, f"cli_{teacher}")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"loss", "kl", "mlm", "cos", "lr", "grad_norm", "tokens", "tokens_per_s"}
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["kl"], r["mlm"], r["cos"]])))
        assert r["loss"] == pytest.approx(5.0 * r["kl"] + 2.0 * r["mlm"] + 1.0 * r["cos"], rel=1e-5)
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    expected = "DistilBertForMaskedLM" if "--as-distilbert" in flags else "RobertaForMaskedLM"
    assert type(student).__name__ == expected
    layers = student.config.n_layers if expected.startswith("DistilBert") else student.config.num_hidden_layers
    assert layers == 2


# One non-default value per TrainConfig field: a field without a value here fails the test, so every new
# flag is covered.
NON_DEFAULT_FLAGS = {
    "teacher": "t", "data": ["a.txt", "b"], "output_dir": "o", "student": "s", "student_layers": 3,
    "as_distilbert": True, "max_length": 128, "batch_size": 7, "grad_accum": 3, "epochs": 2, "max_steps": 9,
    "lr": 1e-3, "weight_decay": 0.01, "warmup": 0.1, "adam_eps": 1e-8, "max_grad_norm": 1.0, "alpha_kl": 0.5,
    "alpha_mlm": 0.25, "alpha_cos": 0.0, "temperature": 4.0, "restrict_kl_to_mask": True, "mask_prop": 0.2,
    "word_mask": 0.7, "word_keep": 0.2, "word_rand": 0.1 + 1e-9, "smoothing": 0.5, "seed": 3, "precision": "fp32",
    "save_every": 11, "log_every": 5, "resume": True, "progress": False,
}


def test_parse_args_maps_every_flag():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(NON_DEFAULT_FLAGS) == set(fields)
    argv = []
    for name, value in NON_DEFAULT_FLAGS.items():
        assert value != fields[name].default, name
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    assert dataclasses.asdict(parse_args(argv)) == NON_DEFAULT_FLAGS
    defaults = parse_args(["--teacher", "t", "--data", "d", "--output-dir", "o"])
    assert dataclasses.asdict(defaults) == {**{n: f.default for n, f in fields.items()},
                                            "teacher": "t", "data": ["d"], "output_dir": "o"}


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = ("--no-" if field.default is True else "--") + field.name.replace("_", "-")
        assert flag in text, flag
        if field.default is not dataclasses.MISSING and not isinstance(field.default, bool):
            assert f"(default: {field.default})" in text, field.name


@pytest.mark.parametrize("field, value, error, match", [
    ("batch_size", 0, ValueError, "batch_size"),
    ("grad_accum", 1.5, ValueError, "grad_accum"),
    ("lr", -1.0, ValueError, "lr"),
    ("lr", "big", TypeError, "lr"),
    ("warmup", 1.0, ValueError, "warmup"),
    ("precision", "fp8", ValueError, "precision"),
    ("teacher", "/nonexistent", ValueError, "teacher"),
    ("max_steps", 0, ValueError, "max_steps"),
    ("temperature", 0.0, ValueError, "temperature"),
    ("temperature", float("nan"), ValueError, "temperature"),
])
def test_config_validation_names_the_argument(workdir, field, value, error, match):
    with pytest.raises(error, match=match):
        config(workdir, "bad", **{field: value}).validate()


def test_half_precision_needs_cuda(workdir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="precision bf16 needs a CUDA device"):
        Trainer(config(workdir, "bf16", precision="bf16"))
