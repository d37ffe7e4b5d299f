"""DDP: 2 CPU processes (gloo) run distil.train's Trainer, on a masked-LM and a causal-LM teacher. Their
parameters must be identical, and equal those of one process that accumulates the same global batch in 2
micro-batches (the trainer hands rank r of K the same slice that micro-batch r of a K-step accumulation gets)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distil.cli import TrainConfig
from distil.train import METRICS, TRAINING_STATE, Trainer

from helpers import GPU_RUN, free_port
from tiny import bert_tokenizer, gpt2_tokenizer, tiny_bert, tiny_causal, write_corpus

STEPS = 3
# No dropout: the single process and the ranks draw different dropout masks.
TEACHERS = {  # kind -> (tokenizer, teacher for it, TrainConfig fields, the CE part's name)
    "masked": (bert_tokenizer, lambda tok: tiny_bert(len(tok), hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0), {}, "mlm"),
    # DistilGPT2's recipe: packed blocks, fused heads
    "causal": (gpt2_tokenizer, lambda tok: tiny_causal("gpt2", len(tok), max_positions=128, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0), {"block_size": 32}, "clm"),
}


def _config(root, out, grad_accum, kind):
    return TrainConfig(teacher=str(root / "teacher"), data=[str(root / "corpus")], output_dir=str(root / out),
                       batch_size=16, grad_accum=grad_accum, max_length=64, max_steps=STEPS, save_every=2,
                       log_every=1, progress=False, **TEACHERS[kind][2])


def _worker(rank, root, port, kind):
    torch.set_num_threads(1)  # 2 processes on a 2-core runner
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
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
    make_tokenizer, make_teacher, _, lm = TEACHERS[kind]
    tok = make_tokenizer()
    make_teacher(tok).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    write_corpus(tmp_path / "corpus", n_files=1, n_lines=120)

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

    losses = [[r for r in map(json.loads, (tmp_path / out / METRICS).read_text().splitlines()) if "loss" in r]
              for out in ("ddp", "single")]
    assert [m["step"] for m in losses[0]] == list(range(1, STEPS + 1))
    for d, s in zip(*losses):
        assert d["tokens"] == s["tokens"]
        # The parts are fp32 means over differently split row sets; a small KL (~1e-3, a difference of
        # nearly equal logs) keeps ~1e-5 of relative rounding, so compare against the total's scale.
        scale = abs(s["loss"])
        for part in ("loss", "kl", lm, "cos"):
            assert d[part] == pytest.approx(s[part], rel=1e-5, abs=1e-6 * scale)
    ckpt = torch.load(tmp_path / "ddp" / f"checkpoint-{STEPS}" / TRAINING_STATE, weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
