"""DDP: 2 CPU processes (gloo) run distil.train's Trainer, on a masked-LM and a causal-LM teacher. Their
parameters must be identical, and equal those of one process that accumulates the same global batch in 2
micro-batches (the trainer hands rank r of K the same slice that micro-batch r of a K-step accumulation gets).
FSDP2: distil-train --fsdp against one process (and its resume against an uninterrupted run), and a causal
student sharded by hand with fully_shard under the step distil-train runs, against one process."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from distil import cli
from distil.checkpoint import TRAINING_STATE
from distil.cli import EXIT_ERROR, EXIT_INTERRUPTED, TrainConfig, exit_without_teardown, main
from distil.fused_loss import DistillationLoss
from distil.step import DistillationStep, StudentRows, causal_labels
from distil.student import auto_model_class, build_student
from distil.train import METRICS, Trainer

from helpers import GPU_RUN, free_port, relative_error
from tiny import bert_tokenizer, gpt2_tokenizer, random_batch, tiny_bert, tiny_causal, write_corpus

STEPS = 3
# No dropout: the single process and the ranks draw different dropout masks.
TEACHERS = {  # kind -> (tokenizer, teacher for it, TrainConfig fields, the CE part's name)
    "masked": (bert_tokenizer, lambda tok: tiny_bert(len(tok), hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0), {}, "mlm"),
    # DistilGPT2's recipe: packed blocks, fused heads
    "causal": (gpt2_tokenizer, lambda tok: tiny_causal("gpt2", len(tok), max_positions=128, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0), {"block_size": 32}, "clm"),
}


def _config(root, out, grad_accum, kind, **flags):
    return TrainConfig(teacher=str(root / "teacher"), data=[str(root / "corpus")], output_dir=str(root / out),
                       batch_size=16, grad_accum=grad_accum, max_length=64, max_steps=STEPS, save_every=2,
                       log_every=1, progress=False, **TEACHERS[kind][2], **flags)


def _write_teacher_and_corpus(root, kind):
    make_tokenizer, make_teacher = TEACHERS[kind][:2]
    tok = make_tokenizer()
    make_teacher(tok).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    write_corpus(root / "corpus", n_files=1, n_lines=120)


def _join_process_group(rank, port):
    torch.set_num_threads(1)  # 2 processes on a 2-core runner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))


def safe_open_keys(directory):
    with safe_open(directory / "model.safetensors", "pt") as f:
        return sorted(f.keys())


def _training_losses(root, out):
    return [r for r in map(json.loads, (root / out / METRICS).read_text().splitlines()) if "loss" in r]


def _assert_same_curve(got, want, lm):
    """Two runs' training rows: the same steps and tokens, every loss part within fp32 rounding."""
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for d, s in zip(got, want):
        assert d["tokens"] == s["tokens"]
        # The parts are fp32 means over differently split row sets; a small KL (~1e-3, a difference of
        # nearly equal logs) keeps ~1e-5 of relative rounding, so compare against the total's scale.
        scale = abs(s["loss"])
        for part in ("loss", "kl", lm, "cos"):
            assert d[part] == pytest.approx(s[part], rel=1e-5, abs=1e-6 * scale)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)  # clipped by the global norm


def _worker(rank, root, port, kind):
    _join_process_group(rank, port)
    try:
        trainer = Trainer(_config(root, "ddp", grad_accum=1, kind=kind))
        trainer.fit()
        torch.save(trainer.student.state_dict(), root / f"rank{rank}.pt")
        # Both ranks leave together: a gloo group destroyed while its peer still works in it hung a rank's
        # exit once on torch 2.11 (both results written, one process never returned).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks and a CPU trainer")
@pytest.mark.parametrize("kind", list(TEACHERS))
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, kind):
    _write_teacher_and_corpus(tmp_path, kind)
    mp.spawn(_worker, args=(tmp_path, free_port(), kind), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    single = Trainer(_config(tmp_path, "single", grad_accum=2, kind=kind))
    initial = {k: v.clone() for k, v in single.student.state_dict().items()}
    single.fit()
    ref = single.student.state_dict()
    assert any(not torch.equal(ref[k], initial[k]) for k in ref)
    for k in ref:
        torch.testing.assert_close(rank0[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)

    _assert_same_curve(_training_losses(tmp_path, "ddp"), _training_losses(tmp_path, "single"), TEACHERS[kind][3])
    ckpt = torch.load(tmp_path / "ddp" / f"checkpoint-{STEPS}" / TRAINING_STATE, weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


# ------------------------------------------------------------------ FSDP2 through distil-train
def _fsdp_trainer_worker(rank, root, port, kind):
    """An uninterrupted --fsdp run ("fsdp"), and one stopped after step 2 and resumed ("split")."""
    _join_process_group(rank, port)
    try:
        Trainer(_config(root, "fsdp", grad_accum=1, kind=kind, fsdp=True)).fit()
        assert Trainer(_config(root, "split", grad_accum=1, kind=kind, fsdp=True)).fit(max_steps=2) == "done"
        resumed = Trainer(_config(root, "split", grad_accum=1, kind=kind, fsdp=True, resume=True))
        assert resumed.resumed_from.name == "checkpoint-2"
        resumed.fit()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # see its docstring: an FSDP2 process may abort in teardown


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks and a CPU trainer")
@pytest.mark.parametrize("kind", list(TEACHERS))
def test_fsdp_trainer_matches_one_process_and_resumes_bit_exactly(tmp_path, kind):
    """distil-train --fsdp on 2 gloo ranks: the loss curve and the saved student of one process that
    accumulates the same global batch; its checkpoints and student/ load with from_pretrained (and the
    causal one generates); a run resumed from checkpoint-2 ends bit-identical to the uninterrupted one,
    optimizer state included."""
    lm = TEACHERS[kind][3]
    _write_teacher_and_corpus(tmp_path, kind)
    mp.spawn(_fsdp_trainer_worker, args=(tmp_path, free_port(), kind), nprocs=2, join=True)
    single = Trainer(_config(tmp_path, "single", grad_accum=2, kind=kind))
    initial = {k: v.clone() for k, v in single.student.state_dict().items()}
    single.fit()
    ref = single.student.state_dict()
    assert any(not torch.equal(ref[k], initial[k]) for k in ref)

    model_class = auto_model_class(kind == "causal")
    sharded, resumed = (model_class.from_pretrained(tmp_path / out / "student") for out in ("fsdp", "split"))
    assert sorted(sharded.state_dict()) == sorted(ref)
    for k, v in sharded.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(resumed.state_dict()[k], v), k
    # The same files as one process writes: a tied head is stored once.
    assert (safe_open_keys(tmp_path / "fsdp" / "student") == safe_open_keys(tmp_path / "single" / "student")
            == safe_open_keys(tmp_path / "fsdp" / f"checkpoint-{STEPS}"))
    checkpoint = model_class.from_pretrained(tmp_path / "fsdp" / f"checkpoint-{STEPS}")
    assert all(torch.equal(v, sharded.state_dict()[k]) for k, v in checkpoint.state_dict().items())
    _assert_same_curve(_training_losses(tmp_path, "fsdp"), _training_losses(tmp_path, "single"), lm)
    timeless = [[{k: v for k, v in row.items() if k != "tokens_per_s"} for row in _training_losses(tmp_path, out)]
                for out in ("split", "fsdp")]
    assert timeless[0] == timeless[1]

    states = [torch.load(tmp_path / out / f"checkpoint-{STEPS}" / TRAINING_STATE, weights_only=True)
              for out in ("fsdp", "split")]
    assert states[0]["world_size"] == 2 and states[0]["flags"]["fsdp"]
    # The whole optimizer state, keyed by parameter name, as one process would hold it.
    optimizer_state = states[0]["optimizer"]["state"]
    assert sorted(optimizer_state) == sorted(dict(single.student.named_parameters()))
    for name, entry in optimizer_state.items():
        assert entry["exp_avg"].shape == ref[name].shape
        for key, value in entry.items():
            assert torch.equal(value, states[1]["optimizer"]["state"][name][key]), (name, key)
    if kind == "causal":
        prompt = torch.tensor([[5, 6, 7, 8]])
        generated = sharded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                     do_sample=False)
        assert generated.shape == (1, 8)
        assert torch.equal(generated, single.student.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                              max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("world_size, flags, message", [
    ("1", (), "fsdp shards the student across processes, but WORLD_SIZE is 1"),
    ("2", ("--precision", "fp16"), "fsdp does not take precision fp16"),
])
def test_fsdp_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, world_size, flags, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    argv = ["--teacher", str(tmp_path / "absent"), "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"),
            "--fsdp", *flags]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks and a CPU trainer")
def test_torchrun_fsdp_job_finishes_with_exit_code_0(tmp_path):
    """The documented command, torchrun -m distil.cli --fsdp, on 2 ranks: the job's exit code is the run's,
    the student is written and loads."""
    _write_teacher_and_corpus(tmp_path, "causal")
    flags = ["--teacher", "teacher", "--data", "corpus", "--output-dir", "out", "--batch-size", "16",
             "--max-length", "64", "--block-size", "32", "--max-steps", "2", "--no-progress", "--fsdp"]
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "distil.cli", *flags], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "distil-train: done at step 2; student in out/student" in job.stderr
    assert auto_model_class(True).from_pretrained(tmp_path / "out" / "student").num_parameters() > 0


@pytest.mark.parametrize("world_size, exits", [("1", "sys.exit"), ("2", "exit_without_teardown")])
def test_a_torchrun_rank_leaves_without_interpreter_teardown(monkeypatch, world_size, exits):
    """distil-train's exit code reaches the shell either way; a rank of a torchrun job skips the teardown that
    can abort an FSDP2 process (exit_without_teardown, recorded here: the real one would end pytest and shut
    its logging down)."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(cli, "main", lambda: EXIT_INTERRUPTED)
    left = []
    monkeypatch.setattr(cli, "exit_without_teardown", lambda code: left.append(("exit_without_teardown", code)))
    try:
        cli.run()
    except SystemExit as exc:
        left.append(("sys.exit", exc.code))
    assert left[0] == (exits, EXIT_INTERRUPTED)


# ------------------------------------------------------------------ FSDP2: the causal student sharded by hand
def _fsdp_setup():
    """A tiny LLaMA teacher (untied head) with a peaked final norm (an O(1) KL), its 2-layer student, the
    fused-head causal step distil-train builds, and a padded batch of 8 rows."""
    teacher = tiny_causal("llama", 60)
    student = build_student(teacher, num_layers=2).train()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(30.0)
    rows = StudentRows(student)
    loss_fn = DistillationLoss(student_head=rows.adapter.projection, teacher_head=teacher.get_output_embeddings())
    ids, attn = random_batch(60, 8, 16, cls_id=1, sep_id=2, pad_id=0, seed=1)
    return student, DistillationStep(rows, teacher, loss_fn), ids, attn


def _train_step(student, step, ids, attn, halves):
    """One AdamW step on the mean of the halves' losses; returns the gradients and the parameters after it."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for half in halves:
        (step(ids[half], attn[half], causal_labels(ids[half], attn[half])).total / len(halves)).backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731  (DTensor shards)
    grads = {k: full(p.grad).clone() for k, p in student.named_parameters()}
    optimizer.step()
    return grads, {k: full(p.detach()).clone() for k, p in student.named_parameters()}


def _fsdp_worker(rank, out, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        student, step, ids, attn = _fsdp_setup()
        for layer in student.model.layers:
            fully_shard(layer)
        # The loss module holds both heads: its forward gathers them, its backward reduce-scatters the
        # student's; the rest of the student (embeddings, final norm) is one more unit around the rows.
        head_loss = step.loss_fn.head_loss
        fully_shard(head_loss)
        fully_shard(step.student_rows, ignored_params=set(head_loss.parameters()))
        result = _train_step(student, step, ids, attn, [slice(4 * rank, 4 * rank + 4)])
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # see its docstring: an FSDP2 process may abort in teardown


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks on the CPU")
def test_fsdp2_sharded_causal_student_matches_one_process(tmp_path):
    """fully_shard (FSDP2) on a causal student and the fused-head loss: two gloo ranks, half the batch each,
    give the gradients and the AdamW step of one process that accumulates both halves."""
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(out, free_port()), nprocs=2, join=True)
    grads, params = torch.load(out, weights_only=True)
    student, step, ids, attn = _fsdp_setup()
    initial = {k: p.detach().clone() for k, p in student.named_parameters()}
    ref_grads, ref_params = _train_step(student, step, ids, attn, [slice(0, 4), slice(4, 8)])
    assert sorted(grads) == sorted(ref_grads) and all(g.abs().max() > 0 for g in ref_grads.values())
    for k in ref_grads:
        assert relative_error(grads[k], ref_grads[k]) <= 1e-5, k
        assert relative_error(params[k], ref_params[k]) <= 1e-5, k
    assert any(not torch.equal(ref_params[k], initial[k]) for k in initial)
