"""The teacher cache of a causal LM (issue 21, item 4): one pass of the ids as the trainer feeds them
(documents per row, or packed blocks), the teacher's next-token top-k / lse / hidden at every position;
k = V reproduces live training; distil-train from it (alone, and under DDP with 2 gloo ranks, each reading
its own slice of the cache) and its refusals."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distil import teacher_cache as TC
from distil.cli import TrainConfig
from distil.data import load_corpus, pack_blocks
from distil.step import causal_labels

import tiny
from helpers import GPU_RUN, assert_batch_holds_teacher_outputs, assert_cache_trains_as_live_teacher, free_port

OPTIONS = dict(top_k=8, temperature=2.0, shard_sequences=16, batch_size=8, max_length=64, progress=False)
CPU_ONLY = pytest.mark.skipif(GPU_RUN, reason="CPU semantics: the fp32 CPU teacher and trainer")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_cache")
    tiny.write_corpus(root / "data", n_files=2, n_lines=40)
    tok = tiny.gpt2_tokenizer()  # no pad token, as GPT-2's
    teacher = tiny.tiny_causal("gpt2", len(tok), max_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    bert_tok = tiny.bert_tokenizer()
    tiny.tiny_bert(len(bert_tok)).save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    return root, teacher, tok


def _files(root):
    return sorted((root / "data").glob("*.txt"))


@CPU_ONLY
@pytest.mark.parametrize("block_size", [None, 32])
def test_a_causal_cache_holds_the_teachers_next_token_outputs_at_every_position(setup, block_size):
    root, teacher, tok = setup
    path = TC.build_cache(root / "teacher", [root / "data"], root / f"cache{block_size}", hidden=True,
                          block_size=block_size, **OPTIONS)
    cache = TC.TeacherCache(path)
    meta = cache.index
    assert meta["causal"] and meta["passes"] == 1 and meta["block_size"] == block_size and meta["masking"] is None
    assert meta["dtypes"] == {"input_ids": "int16", "topk_logits": "float16", "topk_index": "int16", "lse": "float32",
                              "hidden": "float16"}
    sequences = load_corpus(_files(root), tok, max_length=64)
    assert cache.sequences() == (sequences if block_size is None else pack_blocks(sequences, block_size))
    index = torch.arange(len(cache))[::2]
    width = int(cache.lengths[index].max())
    batch = cache.batch(0, index, width, pad_id=tok.eos_token_id)
    assert "labels" not in batch
    ids, attn = batch["input_ids"], batch["attention_mask"]
    real = attn.bool()
    assert real.all() if block_size else not real.all()
    assert_batch_holds_teacher_outputs(teacher, batch, ids, attn)
    data_bytes = sum(f.stat().st_size - TC._npy_header(f)[2] for f in path.glob("pass0/shard*/*.npy"))
    assert data_bytes == meta["num_tokens"] * TC.bytes_per_token(8, len(tok), len(tok), hidden_size=32, causal=True)
    assert TC.bytes_per_token(64, 30522, 30522, causal=True) == 262


def test_causal_and_masked_options_are_refused_where_they_do_not_apply(setup):
    root, _, _ = setup
    with pytest.raises(ValueError, match="passes is 2 but .* causal LM"):
        TC.build_cache(root / "teacher", [root / "data"], root / "bad", passes=2, **OPTIONS)
    with pytest.raises(ValueError, match="block_size is for causal-LM teachers"):
        TC.build_cache(root / "bert", [root / "data"], root / "bad", block_size=32, **OPTIONS)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        TC.build_cache(root / "teacher", [root / "data"], root / "bad", block_size=1, **OPTIONS)
    assert not (root / "bad").exists()


def test_cli_builds_a_causal_cache_and_refuses_masking_passes(setup, capsys):
    root, _, _ = setup
    argv = ["--teacher", str(root / "teacher"), "--data", str(root / "data"), "--output", str(root / "cli"),
            "--top-k", "4", "--block-size", "32", "--max-length", "64", "--no-progress"]
    assert TC.main(argv + ["--passes", "3"]) == 1
    assert "causal LM: nothing is masked" in capsys.readouterr().err
    assert TC.main(argv) == 0
    cache = TC.TeacherCache(root / "cli")
    assert cache.passes == 1 and cache.index["block_size"] == 32 and (cache.lengths == 32).all()


@CPU_ONLY
def test_training_from_a_full_causal_cache_reproduces_the_live_teacher(setup):
    """k = V, float32 logits: the exact top-k KL is the dense KL, so optimizer steps from the cache give
    the live teacher's per-step losses (same blocks, same dropout) to 1e-5; 5 steps reach pass 0 again."""
    root, teacher, tok = setup
    cache = TC.TeacherCache(TC.build_cache(root / "teacher", [root / "data"], root / "full", block_size=24,
                                           **dict(OPTIONS, top_k=teacher.config.vocab_size, dtype="float32")))

    def step_inputs(batch, cached):
        ids, attn = cached.pop("input_ids"), cached.pop("attention_mask")
        assert torch.equal(ids, batch["input_ids"])
        return ids, attn, causal_labels(ids, attn)

    assert_cache_trains_as_live_teacher(teacher, cache, pad_id=tok.eos_token_id, steps=5, step_inputs=step_inputs)


def _config(root, out, cache, **kw):
    return TrainConfig(**{**dict(teacher=str(root / "teacher"), data=[str(root / "data")], output_dir=str(root / out),
                                 teacher_cache=str(cache), block_size=24, alpha_cos=0.0, batch_size=8, grad_accum=2,
                                 max_length=64, max_steps=3, save_every=100, log_every=1, progress=False), **kw})


@pytest.fixture(scope="module")
def train_cache(setup):
    root, _, _ = setup
    return TC.build_cache(root / "teacher", [root / "data"], root / "train_cache", block_size=24,
                          **dict(OPTIONS, top_k=16))


@CPU_ONLY
def test_distil_train_from_a_causal_cache_runs_without_the_teacher_and_resumes_bit_exactly(setup, train_cache):
    from distil.train import Trainer

    root, _, _ = setup
    straight = Trainer(_config(root, "straight", train_cache, max_steps=4, batch_size=32))
    assert straight.teacher is None and straight.masker is None and straight.causal
    assert straight.batches.sequences == straight.cache.sequences()  # the cache's blocks, not packed again
    assert len(straight.batches) < 4  # 4 steps cross an epoch boundary
    assert straight.fit() == "done"
    first = Trainer(_config(root, "split", train_cache, max_steps=4, batch_size=32))
    assert first.fit(max_steps=2) == "done"
    resumed = Trainer(_config(root, "split", train_cache, max_steps=4, batch_size=32, resume=True))
    resumed.fit()
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert resumed.step == 4 and all(torch.equal(a[k], b[k]) for k in a)


def test_distil_train_refuses_a_cache_of_another_kind_or_block_size(setup, train_cache):
    root, _, _ = setup
    with pytest.raises(ValueError, match="block_size is 32 but the teacher cache .* --block-size 24"):
        _config(root, "bad", train_cache, block_size=32).validate()
    with pytest.raises(ValueError, match="block_size is None but"):
        _config(root, "bad", train_cache, block_size=None).validate()
    with pytest.raises(ValueError, match="built from a causal LM but the teacher .* is a masked LM"):
        _config(root, "bad", train_cache, block_size=None, teacher=str(root / "bert")).validate()


# ------------------------------------------------------------------ DDP: each rank its own slice
def _ddp_worker(rank, root, cache, port):
    from distil.train import Trainer

    torch.set_num_threads(1)  # 2 processes on a 2-core runner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    try:
        trainer = Trainer(_config(root, "ddp", cache, grad_accum=1))
        read, real_batch = [], trainer.cache.batch

        def recording_batch(pass_index, sequence_index, width, pad_id):
            read.append(sequence_index.tolist())
            return real_batch(pass_index, sequence_index, width, pad_id)

        trainer.cache.batch = recording_batch
        trainer.fit()
        torch.save({"student": trainer.student.state_dict(), "read": read}, root / f"ddp_rank{rank}.pt")
        dist.barrier()  # both ranks leave together (see tests/test_ddp.py)
    finally:
        dist.destroy_process_group()


@CPU_ONLY
def test_two_gloo_ranks_read_their_own_slices_and_match_one_process(setup, train_cache):
    from distil.train import Trainer

    root, _, _ = setup
    mp.spawn(_ddp_worker, args=(root, train_cache, free_port()), nprocs=2, join=True)
    ranks = [torch.load(root / f"ddp_rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0]["student"][k], ranks[1]["student"][k]) for k in ranks[0]["student"])

    single = Trainer(_config(root, "single", train_cache, grad_accum=2))
    global_batches, reader = [], iter(single.batches)
    for _ in range(3):
        global_batches.append(next(reader)["sequence_index"].tolist())
    single.batches.load_state_dict({**single.batches.state_dict(), "epoch": 0, "position": 0})
    single.fit()
    for k, ref in single.student.state_dict().items():
        torch.testing.assert_close(ranks[0]["student"][k], ref, rtol=1e-5, atol=1e-6, msg=k)
    # One read per rank and step, of that rank's half of the global batch only.
    for step, whole in enumerate(global_batches):
        halves = [ranks[r]["read"][step] for r in range(2)]
        assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(whole)
        assert len(halves[0]) == len(whole) - len(whole) // 2
