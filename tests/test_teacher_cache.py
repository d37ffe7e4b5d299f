"""distil.teacher_cache: what a cache holds (the teacher's outputs on the stored masked input), its size,
the atomic shards and a resumed build that ends byte-identical to an uninterrupted one, the reader,
and the distil-cache-teacher CLI."""
import filecmp
import json

import numpy as np
import pytest
import torch

from distil import teacher_cache as TC
from distil.data import load_corpus

import tiny
from helpers import GPU_RUN, assert_batch_holds_teacher_outputs, assert_cache_trains_as_live_teacher, relative_error

OPTIONS = dict(top_k=8, passes=2, temperature=2.0, shard_sequences=16, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tiny.write_corpus(root / "data", n_files=2, n_lines=40)
    tok = tiny.bert_tokenizer()
    teacher = tiny.tiny_bert(len(tok))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root, teacher, tok


def _tree(path):
    return sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: the fp32 CPU teacher and trainer (a GPU run trains in bf16)")
def test_cache_holds_the_teachers_outputs_on_its_masked_input(setup):
    root, teacher, tok = setup
    path = TC.build_cache(root / "teacher", [root / "data"], root / "hidden", hidden=True, **OPTIONS)
    cache = TC.TeacherCache(path)
    meta = cache.index
    assert meta["complete"] and meta["top_k"] == 8 and meta["passes"] == 2 and meta["temperature"] == 2.0
    assert meta["dtypes"] == {"input_ids": "int16", "labels": "int16", "topk_logits": "float16",
                              "topk_index": "int16", "lse": "float32", "hidden": "float16"}
    assert [f["bytes"] for f in meta["corpus"]] == [p.stat().st_size for p in sorted((root / "data").glob("*.txt"))]
    sequences = load_corpus(sorted((root / "data").glob("*.txt")), tok)
    assert cache.sequences(0) == sequences == cache.sequences(1)
    index = torch.arange(len(cache))[::3]
    width = int(cache.lengths[index].max())
    passes = [cache.batch(p, index, width, tok.pad_token_id) for p in range(2)]
    assert not torch.equal(passes[0]["labels"], passes[1]["labels"])  # each pass masks anew
    assert torch.equal(cache.batch(2, index, width, tok.pad_token_id)["labels"], passes[0]["labels"])  # e mod passes
    for batch in passes:
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        real = attn.bool()
        masked = labels != -100
        assert masked.any() and (masked <= real).all()
        assert (ids[~real] == tok.pad_token_id).all() and (labels[~real] == -100).all()
        assert_batch_holds_teacher_outputs(teacher, batch, ids, attn)


def test_bytes_per_token(setup):
    """2 (id) + 2 (label) + k * (2 + 2) (fp16 logit, int16 index) + 4 (lse) per token and pass, plus
    the .npy headers; 264 bytes at k = 64."""
    root, _, _ = setup
    path = TC.build_cache(root / "teacher", [root / "data"], root / "size", **OPTIONS)
    cache = TC.TeacherCache(path)
    data_bytes = 0
    for f in path.glob("pass*/shard*/*.npy"):
        array = np.load(f, mmap_mode="r")
        data_bytes += array.nbytes
    tokens = cache.index["num_tokens"] * cache.passes
    assert data_bytes == tokens * (2 + 2 + 8 * (2 + 2) + 4) == tokens * TC.bytes_per_token(8, 200, 200)
    assert TC.bytes_per_token(64, 30522, 30522) == 264 and TC.bytes_per_token(64, 50265, 50265) == 4 + 4 + 64 * 6 + 4


def test_interrupted_build_resumes_byte_identical(setup, monkeypatch):
    root, _, _ = setup
    whole = TC.build_cache(root / "teacher", [root / "data"], root / "whole", **OPTIONS)
    # Kill mid-way: a write fails inside the third shard, after two shards were renamed into place.
    writes = []
    real_write = TC._write_npy

    def failing_write(path, array):
        writes.append(path)
        if len(writes) == 13:
            raise KeyboardInterrupt
        real_write(path, array)

    monkeypatch.setattr(TC, "_write_npy", failing_write)
    with pytest.raises(KeyboardInterrupt):
        TC.build_cache(root / "teacher", [root / "data"], root / "resumed", **OPTIONS)
    monkeypatch.setattr(TC, "_write_npy", real_write)
    partial = root / "resumed"
    assert not json.loads((partial / TC.INDEX).read_text())["complete"]
    assert len(list(partial.glob("pass*/shard*.tmp"))) == 1 and len(list(partial.glob("pass*/shard?????"))) == 2
    with pytest.raises(ValueError, match="incomplete"):
        TC.TeacherCache(partial)
    TC.build_cache(root / "teacher", [root / "data"], partial, **OPTIONS)
    assert _tree(whole) == _tree(partial)
    mismatch = filecmp.cmpfiles(whole, partial, [str(p) for p in _tree(whole)], shallow=False)[1:]
    assert mismatch == ([], [])


def test_refuses_a_different_cache_and_bad_options(setup):
    root, _, _ = setup
    TC.build_cache(root / "teacher", [root / "data"], root / "other", **OPTIONS)
    with pytest.raises(ValueError, match="top_k"):
        TC.build_cache(root / "teacher", [root / "data"], root / "other", **dict(OPTIONS, top_k=4))
    for bad, match in ((dict(top_k=0), "top_k"), (dict(passes=0), "passes"), (dict(dtype="int8"), "dtype"),
                       (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            TC.build_cache(root / "teacher", [root / "data"], root / "bad", **dict(OPTIONS, **bad))


def test_cli(setup, capsys):
    root, _, _ = setup
    argv = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--output", str(root / "cli"),
            "--top-k", "4", "--passes", "1", "--dtype", "bfloat16", "--shard-sequences", "64", "--no-progress"]
    assert TC.main(argv) == 0
    cache = TC.TeacherCache(root / "cli")
    assert cache.index["dtypes"]["topk_logits"] == "bfloat16"
    batch = cache.batch(0, torch.tensor([0, 1]), int(cache.lengths[:2].max()), 0)
    assert batch["topk_logits"].dtype == torch.bfloat16 and batch["topk_logits"].shape[-1] == 4
    assert TC.main(argv + ["--top-k", "5"]) == 1
    assert "different cache" in capsys.readouterr().err


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: the fp32 CPU teacher and trainer (a GPU run trains in bf16)")
def test_training_from_a_full_cache_reproduces_the_live_teacher(setup):
    """k = V, float32 logits: the exact top-k KL is the dense KL, so optimizer steps from the cache
    give the live teacher's per-step losses (same batches, masks, dropout) to 1e-5; 6 steps reach pass 1."""
    root, teacher, tok = setup
    cache = TC.TeacherCache(TC.build_cache(root / "teacher", [root / "data"], root / "full",
                                           **dict(OPTIONS, top_k=teacher.config.vocab_size, passes=2,
                                                  dtype="float32")))
    assert_cache_trains_as_live_teacher(
        teacher, cache, pad_id=tok.pad_token_id, steps=6,
        step_inputs=lambda batch, cached: (cached["input_ids"], cached["attention_mask"], cached["labels"]))


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: the fp32 CPU student")
def test_the_students_fused_head_on_a_cache_equals_its_logits(setup):
    """The student's head fused with the cached top-k teacher (distil-train --teacher-cache's default) gives
    the loss parts and the student's gradients of the logits path (--no-fused-head: topk_kl_ce_loss)."""
    from distil.fused_loss import DistillationLoss
    from distil.step import DistillationStep, StudentRows, fused_heads
    from distil.student import build_student

    root, teacher, tok = setup
    cache = TC.TeacherCache(TC.build_cache(root / "teacher", [root / "data"], root / "fused", **OPTIONS))
    student = build_student(teacher).eval()  # no dropout: both steps see the same student
    with torch.no_grad():  # away from the teacher: a KL far from zero
        for p in student.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    rows = StudentRows(student)
    index = torch.arange(len(cache))[:12]
    cached = cache.batch(0, index, int(cache.lengths[index].max()), tok.pad_token_id)
    results = []
    for heads in (fused_heads(rows.adapter), {}):
        step = DistillationStep(rows, None, DistillationLoss(cos_weight=0.0, chunk_rows=16, **heads),
                                cache_temperature=cache.temperature)
        out = step(cached["input_ids"], cached["attention_mask"], cached["labels"], cached)
        out.total.backward()
        results.append([*out[:3], *(p.grad.clone() for p in student.parameters())])
        student.zero_grad()
    assert results[0][1] > 0.05
    for fused, logits in zip(*results):
        assert relative_error(fused, logits) <= 1e-5


def test_distil_train_from_a_cache_runs_without_the_teacher_and_resumes_bit_exactly(setup):
    from distil.cli import TrainConfig
    from distil.train import Trainer

    root, _, _ = setup
    path = TC.build_cache(root / "teacher", [root / "data"], root / "train_cache", **dict(OPTIONS, top_k=16))

    def config(out, **kw):
        return TrainConfig(**dict(teacher=str(root / "teacher"), data=[str(root / "data")], output_dir=str(root / out),
                                  teacher_cache=str(path), alpha_cos=0.0, batch_size=16, grad_accum=2, max_steps=4,
                                  save_every=100, log_every=1, progress=False, **kw))

    straight = Trainer(config("straight"))
    assert straight.teacher is None and straight.masker is None
    # the student's fused head against the cached teacher by default; --no-fused-head: its logits
    assert straight.step_fn.loss_fn.head_loss.teacher_head is None
    assert Trainer(config("logits", fused_head=False)).step_fn.loss_fn.head_loss is None
    assert len(straight.batches) < 4  # 4 steps cross an epoch boundary: pass 1 of the cache
    assert straight.fit() == "done"
    first = Trainer(config("split"))
    assert first.fit(max_steps=2) == "done"
    resumed = Trainer(config("split", resume=True))
    resumed.fit()
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert resumed.step == 4 and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="--alpha-cos 0.*--hidden"):
        TrainConfig(**{**vars(config("bad")), "alpha_cos": 1.0}).validate()
    with pytest.raises(ValueError, match="--temperature 2.0"):
        TrainConfig(**{**vars(config("bad")), "temperature": 3.0}).validate()


def test_distil_train_from_a_cache_takes_another_divergence(setup):
    """distil-train --teacher-cache --divergence jsd --jsd-beta 0.5: the student's fused head takes the JSD on
    the cached top-k teacher's buckets, and the run trains (finite losses, the student moves)."""
    from distil.cli import parse_args
    from distil.train import Trainer

    root, _, _ = setup
    path = TC.build_cache(root / "teacher", [root / "data"], root / "jsd_cache", **dict(OPTIONS, top_k=16))
    flags = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--teacher-cache", str(path),
             "--alpha-cos", "0", "--batch-size", "16", "--max-steps", "2", "--save-every", "100", "--log-every", "1",
             "--no-progress", "--divergence", "jsd", "--jsd-beta", "0.5"]
    trainer = Trainer(parse_args([*flags, "--output-dir", str(root / "jsd_run")]))
    head_loss = trainer.step_fn.loss_fn.head_loss
    assert (head_loss.divergence, head_loss.jsd_beta) == ("jsd", 0.5)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    assert trainer.fit() == "done"
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    rows = [json.loads(line) for line in (root / "jsd_run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "kl" in row]
    assert len(losses) == 2 and all(row["kl"] > 0 and np.isfinite(row["loss"]) for row in losses)


# ------------------------------------------------------------------ refusing what does not match
@pytest.fixture(scope="module")
def built(setup):
    root, _, _ = setup
    return TC.build_cache(root / "teacher", [root / "data"], root / "trusted", **OPTIONS)


def _damaged(built, tmp_path, damage):
    """A copy of the built cache with ``damage(copy)`` applied."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    damage(copy)
    return copy


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _edit_index(copy, **changes):
    index = json.loads((copy / TC.INDEX).read_text())
    index.update(changes)
    (copy / TC.INDEX).write_text(json.dumps(index))


def _restamp(copy, **changes):
    """An edit that also recomputes the checksum (a deliberate forgery: the shard checks still hold)."""
    index = {k: v for k, v in json.loads((copy / TC.INDEX).read_text()).items() if k != "checksum"}
    index.update(changes)
    TC._write_json(copy / TC.INDEX, index)


@pytest.mark.parametrize("case, match", [
    ("truncated shard", r"pass0/shard00000/topk_logits\.npy has \d+ bytes, \d+ expected"),
    ("truncated header", r"pass0/shard00000/lse\.npy has an unreadable \.npy header"),
    ("truncated pass-1 shard", r"pass1/shard00001/labels\.npy has \d+ bytes"),
    ("cut index.json", r"index\.json is not valid JSON"),
    ("passes edited", r"index\.json was edited"),
    ("temperature edited", r"index\.json was edited"),
    ("passes forged", r"passes = 3 but shards for passes \[0, 1\]"),
    ("other k in one shard",
     r"pass1/shard00000/topk_index\.npy holds int16 \(\d+, 4\) but the index records int16 \(\d+, 8\)"),
    ("missing file", r"pass0/shard00001/input_ids\.npy is missing"),
])
def test_a_damaged_cache_is_refused_when_opened_naming_the_file(built, tmp_path, case, match):
    def damage(copy):
        if case == "truncated shard":
            _truncate(copy / "pass0/shard00000/topk_logits.npy", lambda n: n - 7)
        elif case == "truncated header":
            _truncate(copy / "pass0/shard00000/lse.npy", lambda n: 30)
        elif case == "truncated pass-1 shard":
            _truncate(copy / "pass1/shard00001/labels.npy", lambda n: n // 2)
        elif case == "cut index.json":
            _truncate(copy / TC.INDEX, lambda n: n // 2)
        elif case == "passes edited":
            _edit_index(copy, passes=3)
        elif case == "temperature edited":
            _edit_index(copy, temperature=1.0)
        elif case == "passes forged":
            _restamp(copy, passes=3)
        elif case == "other k in one shard":
            f = copy / "pass1/shard00000/topk_index.npy"
            TC._write_npy(f, np.load(f)[:, :4])
        elif case == "missing file":
            (copy / "pass0/shard00001/input_ids.npy").unlink()

    with pytest.raises(ValueError, match=match):
        TC.TeacherCache(_damaged(built, tmp_path, damage))


def test_verify_rehashes_the_data(built, tmp_path):
    def flip(copy):
        f = copy / "pass0/shard00000/topk_logits.npy"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF  # same size, same header: only a hash sees it
        f.write_bytes(bytes(data))

    TC.TeacherCache(built).verify()
    assert TC.main(["--verify", str(built)]) == 0
    copy = _damaged(built, tmp_path, flip)
    TC.TeacherCache(copy)  # the structure is intact
    with pytest.raises(ValueError, match=r"pass0/shard00000/topk_logits\.npy does not match its recorded sha256"):
        TC.TeacherCache(copy).verify()
    assert TC.main(["--verify", str(copy)]) == 1


def test_a_resumed_build_redoes_a_damaged_shard(setup, built, tmp_path):
    """Resuming over a shard folder missing a file (or holding a truncated one) rebuilds that shard, and
    the result is byte-identical to the uninterrupted build."""
    root, _, _ = setup

    def damage(copy):
        (copy / "pass1/shard00001/lse.npy").unlink()
        _truncate(copy / "pass0/shard00000/labels.npy", lambda n: n - 1)
        _restamp(copy, complete=False, files=None)
        index = json.loads((copy / TC.INDEX).read_text())
        del index["files"]
        TC._write_json(copy / TC.INDEX, {k: v for k, v in index.items() if k != "checksum"})

    copy = _damaged(built, tmp_path, damage)
    TC.build_cache(root / "teacher", [root / "data"], copy, **OPTIONS)
    assert _tree(built) == _tree(copy)
    assert filecmp.cmpfiles(built, copy, [str(p) for p in _tree(built)], shallow=False)[1:] == ([], [])


def _other_dirs(root, teacher, tok):
    """A teacher directory with a permuted vocabulary of the same size (same weights), and one with the
    same tokenizer but other weights."""
    import shutil

    permuted = root / "permuted"
    if not permuted.exists():
        shutil.copytree(root / "teacher", permuted)
        spec = json.loads((permuted / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[20:22]
        vocab[a], vocab[b] = vocab[b], vocab[a]  # two ordinary words swap ids
        (permuted / "tokenizer.json").write_text(json.dumps(spec))
    retrained = root / "retrained"
    if not retrained.exists():
        tiny.tiny_bert(len(tok), seed=1).save_pretrained(retrained)
        tok.save_pretrained(retrained)
    return permuted, retrained


def test_another_tokenizer_or_teacher_is_refused(setup, built):
    from transformers import AutoTokenizer

    root, teacher, tok = setup
    permuted, retrained = _other_dirs(root, teacher, tok)
    cache = TC.TeacherCache(built)
    files = sorted((root / "data").glob("*.txt"))
    cache.check_sources(files, tok, root / "teacher")
    other_tok = AutoTokenizer.from_pretrained(permuted)
    assert len(other_tok) == len(tok)
    with pytest.raises(ValueError, match="tokenizer in .*permuted .*is not the one"):
        cache.check_sources(files, other_tok, permuted)
    with pytest.raises(ValueError, match="retrained is not the teacher the cache .* was built from"):
        cache.check_sources(files, tok, retrained)


def test_distil_train_refuses_a_mismatched_or_damaged_cache_with_one_line(setup, built, tmp_path):
    import subprocess
    import sys

    root, teacher, tok = setup
    permuted, retrained = _other_dirs(root, teacher, tok)
    damaged = _damaged(built, tmp_path, lambda c: _truncate(c / "pass1/shard00001/topk_logits.npy", lambda n: n - 1))
    for teacher_dir, cache, match in ((permuted, built, "tokenizer in"), (retrained, built, "not the teacher"),
                                      (root / "teacher", damaged, "pass1/shard00001/topk_logits.npy has")):
        out = subprocess.run([sys.executable, "-m", "distil.cli", "--teacher", str(teacher_dir), "--data",
                              str(root / "data"), "--output-dir", str(tmp_path / "run"), "--teacher-cache", str(cache),
                              "--alpha-cos", "0", "--max-steps", "1", "--no-progress"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("distil-train: error:") and match in lines[0], out.stderr


def test_an_error_mid_run_writes_a_checkpoint_first(setup, built, monkeypatch):
    from distil.cli import TrainConfig
    from distil.train import StepError, Trainer, checkpoints

    root, _, _ = setup
    trainer = Trainer(TrainConfig(teacher=str(root / "teacher"), data=[str(root / "data")],
                                  output_dir=str(root / "midrun"), teacher_cache=str(built), alpha_cos=0.0,
                                  batch_size=16, grad_accum=1, max_steps=4, save_every=100, log_every=1,
                                  progress=False))
    real_batch, calls = trainer.cache.batch, []

    def failing_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("Input/output error: pass0/shard00001/topk_logits.npy")
        return real_batch(*args)

    monkeypatch.setattr(trainer.cache, "batch", failing_batch)
    with pytest.raises(StepError, match=r"step 3 failed \(OSError: Input/output error.*checkpoint-2 written"):
        trainer.fit()
    assert [step for step, _ in checkpoints(root / "midrun")] == [2]


# ------------------------------------------------------------------ a build under torchrun
def _rank_builder(rank, root, port):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 processes on a 2-core runner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    for output in ("ranks", "interrupted"):  # a fresh build, then the resumption of an interrupted one
        TC.build_cache(root / "teacher", [root / "data"], root / output, **OPTIONS)
    assert not dist.is_initialized()  # the builder's own group, left


@pytest.mark.skipif(GPU_RUN, reason="CPU semantics: gloo ranks and a CPU teacher")
def test_two_ranks_build_a_cache_byte_identical_to_one_process_and_resume_an_interrupted_one(setup, built):
    """Shards by rank (table position mod 2), the index by rank 0 after both hashed theirs: the same bytes
    as the one-process build. The interrupted build (a shard missing, one cut short, one left as .tmp,
    the index unfinished) is finished by the two ranks, byte-identical too."""
    import shutil

    import torch.multiprocessing as mp

    from helpers import free_port

    root, _, _ = setup
    for name in ("ranks", "interrupted"):
        shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(built, root / "interrupted")
    copy = root / "interrupted"
    shutil.rmtree(copy / "pass0/shard00001")
    shutil.copytree(copy / "pass1/shard00002", copy / "pass1/shard00002.tmp")
    shutil.rmtree(copy / "pass1/shard00002")
    _truncate(copy / "pass1/shard00003/topk_index.npy", lambda n: n - 2)
    index = {k: v for k, v in json.loads((copy / TC.INDEX).read_text()).items() if k not in ("checksum", "files")}
    TC._write_json(copy / TC.INDEX, dict(index, complete=False))
    kept = (copy / "pass0/shard00000/lse.npy").stat().st_mtime_ns

    mp.spawn(_rank_builder, args=(root, free_port()), nprocs=2, join=True)
    assert len(TC.read_index(built)["shards"]) > 4  # both ranks had several shards
    for output in ("ranks", "interrupted"):
        assert _tree(built) == _tree(root / output), output
        assert filecmp.cmpfiles(built, root / output, [str(p) for p in _tree(built)], shallow=False)[1:] == ([], [])
    assert (copy / "pass0/shard00000/lse.npy").stat().st_mtime_ns == kept  # a whole shard is kept, not redone
