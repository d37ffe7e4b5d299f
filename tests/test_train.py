"""distil.step and distil.train: the fused-path step against distiller.py's eager step (float64), the
step's skipped work for zero weights, bit-exact resume, checkpoints, the non-finite stops, validation.
The command line (distil.cli) is tested in test_cli.py."""
import copy
import importlib.util
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForMaskedLM

from distil.checkpoint import TRAINING_STATE
from distil.cli import TrainConfig
from distil.fused_loss import DistillationLoss
from distil.masking import MLMMasker
from distil.reference import distiller_step
from distil.step import DistillationStep, StudentRows
from distil.student import build_student
from distil.train import METRICS, STUDENT, NonFiniteError, Trainer, checkpoints, json_record

from helpers import GPU_RUN, relative_error
from tiny import bert_tokenizer, random_batch, roberta_tokenizer, tiny_bert, tiny_roberta, write_corpus


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


def metrics(workdir, out, kind="loss"):
    """The rows of a run's metrics.jsonl that hold ``kind`` (training rows: "loss"; validation: "eval_loss")."""
    rows = [json.loads(line) for line in (workdir / out / METRICS).read_text().splitlines()]
    return [r for r in rows if kind in r]


def state(workdir, out, step):
    return torch.load(workdir / out / f"checkpoint-{step}" / TRAINING_STATE, weights_only=True)


# ------------------------------------------------------------------ the step itself
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("as_distilbert", [False, True])
@pytest.mark.parametrize("restrict", [False, True])
def test_step_matches_distiller_eager_step_in_float64(restrict, as_distilbert, fused_head):
    tok = bert_tokenizer()
    vocab = len(tok)
    teacher = tiny_bert(vocab, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(teacher, as_distilbert=as_distilbert).train()
    ref_student = copy.deepcopy(student).double()
    with torch.no_grad():  # a peaked teacher far from the student: the KL is O(1), not a rounding residue
        teacher.cls.predictions.bias.copy_(3.0 * torch.randn(vocab))
    ids, attn = random_batch(vocab, 6, 24, cls_id=2, sep_id=3, pad_id=0, seed=1)
    masked, labels = MLMMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_id=4)(ids, attn,
                                                                              torch.Generator().manual_seed(3))
    assert (labels != -100).sum() > 0 and (attn == 0).sum() > 0  # both row kinds are exercised

    ref = distiller_step(ref_student, copy.deepcopy(teacher).double(), masked, attn, labels,
                         restrict_kl_to_mask=restrict)
    ref[0].backward()

    heads = {}
    if fused_head:  # the projections fused into the KL+CE loss
        heads = dict(student_head=student.get_output_embeddings(), teacher_head=teacher.get_output_embeddings())
    loss_fn = DistillationLoss(**heads)
    out = DistillationStep(StudentRows(student), teacher, loss_fn, restrict_kl_to_mask=restrict)(masked, attn, labels)
    out.total.backward()
    assert ref[1] > 0.1
    for got, want in zip((out.total, out.kl, out.ce, out.cos), ref):
        assert relative_error(got, want) <= 1e-5
    ours = dict(student.named_parameters())
    pairs = [(ours[name].grad, p.grad) for name, p in ref_student.named_parameters()]
    assert all(g is not None for g, _ in pairs)
    assert relative_error(torch.cat([g.flatten() for g, _ in pairs]),
                          torch.cat([r.flatten() for _, r in pairs])) <= 1e-5
    scale = max(r.norm() for _, r in pairs)
    for name, (g, r) in zip(ours, pairs):
        if r.norm() > 1e-4 * scale:  # attention key biases have an exactly-zero gradient: only rounding noise
            assert relative_error(g, r) <= 1e-4, name


def test_fused_head_step_under_autocast_with_a_16bit_teacher():
    """distil-train on a GPU: a bf16 teacher under bf16 autocast hands the heads fp32 hidden states (its
    LayerNorm runs in fp32 under autocast) beside bf16 weights. The fused heads must multiply them as
    F.linear under autocast does (both in bf16), as the logits path does, not refuse the dtype pair."""
    tok = bert_tokenizer()
    vocab = len(tok)
    teacher = tiny_bert(vocab, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(teacher).train()
    teacher = teacher.to(torch.bfloat16)
    ids, attn = random_batch(vocab, 4, 16, cls_id=2, sep_id=3, pad_id=0, seed=1)
    masked, labels = MLMMasker(vocab, special_ids=[0, 1, 2, 3, 4], mask_id=4)(ids, attn,
                                                                              torch.Generator().manual_seed(3))
    totals = []
    for fused in (False, True):
        heads = (dict(student_head=student.get_output_embeddings(), teacher_head=teacher.get_output_embeddings())
                 if fused else {})
        step = DistillationStep(StudentRows(student), teacher, DistillationLoss(**heads), autocast_dtype=torch.bfloat16)
        totals.append(step(masked, attn, labels).total.detach().float())
    assert torch.isfinite(totals[1])
    assert relative_error(totals[1], totals[0]) <= 1e-2


@pytest.mark.parametrize("alphas", [(0.0, 2.0, 0.0), (0.0, 2.0, 1.0), (5.0, 0.0, 1.0)])
def test_step_skips_the_teacher_work_that_zero_weights_switch_off(alphas):
    alpha_kl, alpha_mlm, alpha_cos = alphas
    tok = bert_tokenizer()
    teacher = tiny_bert(len(tok), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(teacher).train()
    ref_student = copy.deepcopy(student).double()
    with torch.no_grad():  # a peaked teacher: the KL is O(1), not a rounding residue
        teacher.cls.predictions.bias.copy_(3.0 * torch.randn(len(tok)))
    ids, attn = random_batch(len(tok), 6, 24, cls_id=2, sep_id=3, pad_id=0, seed=1)
    masked, labels = MLMMasker(len(tok), special_ids=[0, 1, 2, 3, 4], mask_id=4)(ids, attn,
                                                                                 torch.Generator().manual_seed(3))
    ref = distiller_step(ref_student, copy.deepcopy(teacher).double(), masked, attn, labels, restrict_kl_to_mask=False,
                     alpha_kl=alpha_kl, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos)

    calls = {"body": 0, "head": 0}
    for part, module in (("body", teacher.bert), ("head", teacher.get_output_embeddings())):
        module.register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    loss_fn = DistillationLoss(kl_weight=alpha_kl, ce_weight=alpha_mlm, cos_weight=alpha_cos)
    step = DistillationStep(StudentRows(student), teacher, loss_fn)
    rows = step.rows(masked, attn, labels)
    out = step(masked, attn, labels)
    for got, want, alpha in zip((out.total, out.kl, out.ce, out.cos), ref, (1.0, *alphas)):
        if alpha > 0:  # the reference reports switched-off parts too; ours are not computed (0)
            assert relative_error(got, want) <= 1e-5
    assert calls == {"body": 2 * (alpha_kl > 0 or alpha_cos > 0), "head": 2 * (alpha_kl > 0)}
    if alpha_kl == 0:  # the student's head runs on the masked rows only
        assert rows.student_logits.shape[0] == int((labels != -100).sum()) and (rows.labels != -100).all()


def test_step_refuses_a_loss_that_restricts_the_rows_again():
    tok = bert_tokenizer()
    teacher = tiny_bert(len(tok))
    with pytest.raises(ValueError, match="restrict_kl_to_mask"):
        DistillationStep(StudentRows(build_student(teacher)), teacher, DistillationLoss(restrict_kl_to_mask=True))


# ------------------------------------------------------------------ resume, checkpoints, non-finite stops
def test_resume_is_bit_exact_across_an_epoch_boundary(workdir):
    # Dropout is on (tiny teachers keep BERT's 0.1), so this also checks that RNG states travel.
    straight = Trainer(config(workdir, "straight"))
    assert len(straight.batches) < 4  # 4 steps cross an epoch boundary
    before = {k: v.clone() for k, v in straight.student.state_dict().items()}
    assert straight.fit() == "done"

    first = Trainer(config(workdir, "split"))
    assert first.fit(max_steps=2) == "done"
    assert state(workdir, "split", 2)["step"] == 2
    assert not list((workdir / "split").glob(".*tmp"))
    resumed = Trainer(config(workdir, "split", resume=True))
    assert resumed.resumed_from == workdir / "split" / "checkpoint-2"
    resumed.fit()
    assert resumed.step == 4

    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    assert [m["loss"] for m in metrics(workdir, "straight")] == [m["loss"] for m in metrics(workdir, "split")]
    # the finished run's student and every checkpoint are model directories that transformers loads
    for directory in ("student", "checkpoint-4"):
        loaded = AutoModelForMaskedLM.from_pretrained(workdir / "split" / directory)
        assert all(torch.equal(v, b[k].cpu()) for k, v in loaded.state_dict().items())
        assert (workdir / "split" / directory / "model.safetensors").stat().st_mode & 0o044 == 0o044  # world-readable


def test_resume_falls_back_from_a_damaged_checkpoint_and_truncates_the_metrics(workdir, capsys):
    Trainer(config(workdir, "damaged", save_every=2)).fit()
    reference = Trainer(config(workdir, "damaged_ref", save_every=2))
    reference.fit()
    assert [s for s, _ in checkpoints(workdir / "damaged")] == [4, 2]
    newest = workdir / "damaged" / "checkpoint-4" / TRAINING_STATE
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    with (workdir / "damaged" / METRICS).open("a") as f:
        f.write('{"step": 5, "loss": 1.0')  # and a torn metrics line

    resumed = Trainer(config(workdir, "damaged", save_every=2, resume=True))
    assert "skipping unreadable checkpoint" in capsys.readouterr().err
    assert resumed.resumed_from.name == "checkpoint-2" and resumed.step == 2
    assert [m["step"] for m in metrics(workdir, "damaged")] == [1, 2]  # rows after step 2 are gone
    resumed.fit()
    assert [m["step"] for m in metrics(workdir, "damaged")] == [1, 2, 3, 4]
    ref = reference.student.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.student.state_dict().items())


def test_save_total_limit_keeps_the_newest_checkpoints_and_tensorboard_gets_events(workdir):
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    Trainer(config(workdir, "limit", save_every=1, save_total_limit=2,
                   report_to="tensorboard" if tensorboard else "none")).fit()
    assert [s for s, _ in checkpoints(workdir / "limit")] == [4, 3]
    if tensorboard:
        assert list((workdir / "limit" / "runs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("flag, value", [("batch_size", 16), ("max_steps", 8)])
def test_resume_names_a_changed_flag(workdir, flag, value):
    Trainer(config(workdir, f"changed_{flag}")).fit(max_steps=1)
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} is {value!r} but .*checkpoint-1"):
        Trainer(config(workdir, f"changed_{flag}", resume=True, **{flag: value}))
    # flags that only change how the run is watched and saved may change
    Trainer(config(workdir, f"changed_{flag}", resume=True, log_every=3, save_every=7, progress=True))


def test_resume_of_a_checkpoint_from_before_a_new_flag_takes_its_default(workdir):
    """A checkpoint written before --divergence existed resumes with the default, and is refused for
    another value."""
    Trainer(config(workdir, "older")).fit(max_steps=1)
    path = workdir / "older" / "checkpoint-1" / TRAINING_STATE
    state = torch.load(path, weights_only=True)
    for name in ("divergence", "jsd_beta", "skew_alpha"):
        del state["flags"][name]
    torch.save(state, path)
    Trainer(config(workdir, "older", resume=True))
    with pytest.raises(ValueError, match="--divergence is 'jsd' but .*checkpoint-1 was written with 'forward_kl'"):
        Trainer(config(workdir, "older", resume=True, divergence="jsd"))


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
        Trainer(config(workdir, "empty", resume=True))


def test_nan_loss_stops_and_names_the_last_good_checkpoint(workdir):
    trainer = Trainer(config(workdir, "nan", save_every=1, alpha_cos=0.0))
    trainer.fit(max_steps=1)
    good = (workdir / "nan" / "checkpoint-1" / TRAINING_STATE).read_bytes()
    with torch.no_grad():
        next(trainer.student.parameters()).fill_(float("nan"))
    # Whichever is caught first (the loss parts, or the gradient norm when a loss op hides the NaN),
    # the run stops before the optimizer moves and names the checkpoint that exists.
    with pytest.raises(NonFiniteError, match=r"not finite: .* at step 2 .*checkpoint-1 "):
        trainer.fit(max_steps=3)
    assert [s for s, _ in checkpoints(workdir / "nan")] == [1]
    assert (workdir / "nan" / "checkpoint-1" / TRAINING_STATE).read_bytes() == good
    last = metrics(workdir, "nan")[-1]  # the diverged step is logged, its non-finite values as null
    assert last["step"] == 2 and last["non_finite"] and all(last[k] is None for k in last["non_finite"])
    assert last["cos"] == 0.0  # switched off, not NaN


def test_non_finite_gradient_stops_before_the_optimizer_moves(workdir):
    trainer = Trainer(config(workdir, "nan_grad"))
    param = next(trainer.student.parameters())
    before = param.detach().clone()
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError, match="not finite: grad_norm at step 1 .*No checkpoint was written yet"):
        trainer.fit()
    assert torch.equal(param.detach(), before) and not checkpoints(workdir / "nan_grad")


def test_non_finite_parameters_stop_the_run(workdir):
    trainer = Trainer(config(workdir, "nan_param"))
    param = next(trainer.student.parameters())
    trainer.optimizer.register_step_post_hook(lambda *_: param.data.fill_(float("inf")))
    with pytest.raises(NonFiniteError, match="norm of the parameters is not finite after the optimizer step at step 1"):
        trainer.fit()
    assert not checkpoints(workdir / "nan_param") and not (workdir / "nan_param" / STUDENT).exists()


def test_json_record_is_strict_json():
    line = json_record({"step": 3, "loss": float("nan"), "kl": float("inf"), "cos": 0.5, "tokens": 7})
    assert json.loads(line) == {"step": 3, "loss": None, "kl": None, "cos": 0.5, "tokens": 7,
                                "non_finite": ["kl", "loss"]}
    assert "NaN" not in line and "Infinity" not in line


# ------------------------------------------------------------------ metrics and validation
def test_metrics_are_averaged_over_log_every_and_validation_runs_on_a_fixed_held_out_split(workdir):
    every = Trainer(config(workdir, "avg1", log_every=1, eval_every=2))
    every.fit()
    train = metrics(workdir, "avg1")
    averaged = Trainer(config(workdir, "avg2", log_every=2, eval_every=100))
    averaged.fit()
    rows = metrics(workdir, "avg2")
    assert [r["step"] for r in rows] == [2, 4] and [r["steps"] for r in rows] == [2, 2]
    for row, pair in zip(rows, (train[:2], train[2:])):
        for key in ("loss", "kl", "mlm", "cos", "grad_norm"):
            assert row[key] == pytest.approx(sum(p[key] for p in pair) / 2, rel=1e-12)
        assert row["tokens"] == sum(p["tokens"] for p in pair)

    evals = metrics(workdir, "avg1", "eval_loss")
    assert [r["step"] for r in evals] == [2, 4]  # every --eval-every steps, and the end is step 4
    assert [r["step"] for r in metrics(workdir, "avg2", "eval_loss")] == [4]  # only at the end
    for r in evals:
        assert set(r) >= {"eval_loss", "eval_kl", "eval_mlm", "eval_mlm_accuracy", "eval_cos",
                          "eval_teacher_mlm", "eval_teacher_mlm_accuracy"}
        assert 0 <= r["eval_mlm_accuracy"] <= 1 and r["eval_mlm"] > 0
    # The split and its masking do not depend on the run's seed: the teacher's figures are equal.
    other_seed = Trainer(config(workdir, "seed7", seed=7, max_steps=0))
    assert other_seed.fit() == "done"
    (teacher_only,) = metrics(workdir, "seed7", "eval_loss")
    assert teacher_only["eval_teacher_mlm"] == evals[0]["eval_teacher_mlm"]
    n_eval = sum(len(ids) for ids, _, _ in every.eval_batches)
    assert n_eval == math.ceil(0.01 * (n_eval + len(every.batches.sequences)))  # the default --eval-fraction


def test_max_steps_0_saves_the_initial_student(workdir):
    trainer = Trainer(config(workdir, "zero", max_steps=0))
    initial = {k: v.cpu().clone() for k, v in trainer.student.state_dict().items()}
    assert trainer.fit() == "done" and trainer.step == 0
    loaded = AutoModelForMaskedLM.from_pretrained(workdir / "zero" / STUDENT)
    assert all(torch.equal(v, initial[k]) for k, v in loaded.state_dict().items())


def test_half_precision_needs_cuda(workdir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="precision bf16 needs a CUDA device"):
        Trainer(config(workdir, "bf16", precision="bf16"))


# ------------------------------------------------------------------ the default step's backward
class _BufferWrites(TorchDispatchMode):
    """Per call of distil::linear_kl_ce_backward: which gradient buffers it changed (contents compared:
    a custom op's in-place writes do not bump version counters)."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.distil.linear_kl_ce_backward.default:
            return func(*args, **(kwargs or {}))
        before = [b.clone() for b in args[:3]]
        out = func(*args, **(kwargs or {}))
        self.writes.append([not torch.equal(b, old) for b, old in zip(args[:3], before)])
        return out


def _default_step(trainer):
    """One micro-batch of Trainer.train_step, as it runs it: the loss scale announced, then backward."""
    ids, attn, labels, cached, weight = next(trainer._micro_batches())
    loss_scale = trainer.scaler.scale(torch.full((), weight / trainer.config.grad_accum, device=trainer.device))
    out = trainer.step_fn(ids, attn, labels, cached, grad_scale=loss_scale)
    return out.total * loss_scale


def test_default_step_backward_leaves_the_fused_heads_buffers_alone(workdir, monkeypatch):
    """The trainer announces its loss scale (1/grad_accum here) to the fused heads, so their backward is
    free: no chunk pass runs again and no gradient buffer is touched (no rescale either)."""
    from distil._ops import linear_kl_ce

    trainer = Trainer(config(workdir, "free_backward", alpha_cos=1.0))
    passes = []
    run_chunks = linear_kl_ce._run_chunks
    monkeypatch.setattr(linear_kl_ce, "_run_chunks", lambda *a: passes.append(1) or run_chunks(*a))
    loss = _default_step(trainer)
    assert len(passes) == 1  # the forward's
    with _BufferWrites() as mode:
        loss.backward()
    assert mode.writes == [[False, False, False]] and len(passes) == 1


@pytest.mark.skipif(not (torch.cuda.is_available() and GPU_RUN), reason="needs a GPU run (DISTIL_GPU_TESTS=1)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_default_step_backward_has_no_host_sync_on_cuda(workdir, precision):
    """torch.cuda.set_sync_debug_mode("error") around the backward of a default training step (fused
    heads, the loss scale as a device tensor; fp16 with the GradScaler's scale). The forward's
    masked_gather syncs once by design (its exact mode sizes the rows on the host)."""
    trainer = Trainer(config(workdir, f"no_sync_{precision}", precision=precision))
    loss = _default_step(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    grads = torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None])
    assert grads.isfinite().all() and grads.abs().sum() > 0
