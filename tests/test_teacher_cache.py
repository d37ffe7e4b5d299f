"""distil.teacher_cache: what a cache holds (the teacher's outputs on the stored masked input), its size,
the atomic shards and a resumed build that ends byte-identical to an uninterrupted one, the reader,
and the distil-cache-teacher CLI."""
import filecmp
import itertools
import json

import numpy as np
import pytest
import torch
import tiny

from distil import teacher_cache as TC
from distil.data import load_corpus

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
        with torch.no_grad():
            out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        logits = out.logits[real]
        values = logits.topk(8, -1).values
        # The cached indices pick the k largest logits (near-ties may come in another order).
        assert torch.allclose(logits.gather(-1, batch["topk_index"][real].long()), values, atol=1e-5)
        assert torch.allclose(batch["topk_logits"][real].float(), values, atol=1e-2, rtol=1e-3)
        assert torch.allclose(batch["lse"][real], torch.logsumexp(logits / 2.0, -1), atol=1e-5)
        assert torch.allclose(batch["hidden"][real].float(), out.hidden_states[-1][real], atol=1e-2)


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
    assert TC.main(argv + ["--top-k", "5"]) == 2
    assert "different cache" in capsys.readouterr().err


def test_training_from_a_full_cache_reproduces_the_live_teacher(setup):
    """k = V, float32 logits: the exact top-k KL is the dense KL, so optimizer steps from the cache
    give the live teacher's per-step losses (same batches, masks, dropout) to 1e-5."""
    from distil.data import LengthGroupedBatches
    from distil.fused_loss import DistillationLoss
    from distil.step import DistillationStep, StudentRows
    from distil.student import build_student

    root, teacher, tok = setup
    vocab = teacher.config.vocab_size
    cache = TC.TeacherCache(TC.build_cache(root / "teacher", [root / "data"], root / "full",
                                           **dict(OPTIONS, top_k=vocab, passes=2, dtype="float32")))
    loss_fn = DistillationLoss(alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=0.0, temperature=2.0)
    runs = {}
    for name in ("live", "cached"):
        torch.manual_seed(0)
        student = build_student(teacher).train()
        step = DistillationStep(StudentRows(student), teacher if name == "live" else None, loss_fn,
                                cache_temperature=cache.temperature)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        reader = LengthGroupedBatches(cache.sequences(), 8, seed=3, pad_id=tok.pad_token_id)
        losses = []
        for i, batch in zip(range(6), itertools.chain(reader, reader)):  # into epoch 1: pass 1
            cached = cache.batch(batch["epoch"], batch["sequence_index"], batch["input_ids"].shape[1],
                                 tok.pad_token_id)
            torch.manual_seed(100 + i)  # the same dropout in both runs
            out = step(cached["input_ids"], cached["attention_mask"], cached["labels"], cached)
            out.total.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(torch.stack([out.total, out.kl, out.mlm]).detach())
        runs[name] = torch.stack(losses)
    # Per step: the total to 1e-5 relative, each part to 1e-5 of the total (a small KL is a difference
    # of sums whose fp32 rounding differs between the dense and the top-k kernels).
    scale = runs["live"][:, :1].abs()
    assert ((runs["cached"] - runs["live"]).abs() <= 1e-5 * scale).all(), (runs["cached"] - runs["live"]) / scale


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
