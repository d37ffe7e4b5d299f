"""The causal step (issue 21, items 2 and 3): distil.step on decoders against the float64 restatement of
distiller.py's causal branch (fused heads and logits), next-token labels, packed blocks and padded rows
(attention mask, position ids), a student you bring with a differently padded vocabulary, Gemma2's
soft-capped logits, distil-train end to end on tiny GPT-2, LLaMA and Gemma2 teachers, and the refusals
(one line, before any model loads)."""
import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from distil.cli import EXIT_ERROR, TrainConfig, main
from distil.data import pack_blocks
from distil.fused_loss import DistillationLoss
from distil.reference import distiller_causal_step
from distil.step import DistillationStep, StudentRows, causal_labels, fused_heads
from distil.student import build_student, lm_adapter, logit_transform
from distil.train import METRICS, STUDENT, Trainer

from helpers import one_error_line, relative_error
from tiny import bert_tokenizer, gpt2_tokenizer, random_batch, roberta_tokenizer, tiny_bert, tiny_causal, write_corpus

V = 50


def _peaked(teacher):
    """The teacher's final norm scaled up after the student copied it: peaked teacher logits far from the
    student's, so the KL is O(1) rather than a rounding residue."""
    norm = teacher.transformer.ln_f if hasattr(teacher, "transformer") else teacher.model.norm
    with torch.no_grad():
        norm.weight.mul_(30.0)
    return teacher


def _grads_match(student, ref_student):
    ours = dict(student.named_parameters())
    pairs = [(ours[name].grad, p.grad) for name, p in ref_student.named_parameters()]
    assert all(g is not None for g, _ in pairs)
    assert relative_error(torch.cat([g.flatten() for g, _ in pairs]),
                          torch.cat([r.flatten() for _, r in pairs])) <= 1e-5


# ------------------------------------------------------------------ labels, blocks, positions
def test_causal_labels_are_the_next_real_token_on_the_predicting_row():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert causal_labels(ids, attn).tolist() == [[6, 7, 8, -100], [6, -100, -100, -100]]
    with pytest.raises(ValueError, match="attention_mask"):
        causal_labels(ids, attn[:, :-1])


def test_pack_blocks_is_group_texts():
    assert pack_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 dropped
    assert pack_blocks([[1, 2]], 4) == []
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([[1, 2]], 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_rows_and_packed_blocks_see_the_right_mask_and_positions(family):
    model = tiny_causal(family, V)
    adapter = lm_adapter(model)
    ids, attn = random_batch(V, 4, 12, cls_id=1, sep_id=2, pad_id=0, seed=2)
    with torch.no_grad():
        hidden = adapter.body(ids, attn)
        for row in range(ids.shape[0]):  # each padded row equals the row alone, unpadded (positions 0..n-1)
            n = int(attn[row].sum())
            alone = model(ids[row : row + 1, :n], output_hidden_states=True).hidden_states[-1][0]
            assert relative_error(hidden[row, :n], alone) <= 1e-6
        # A left-padded row too: positions count real tokens, as generate forms them.
        n = int(attn[1].sum())
        left = torch.cat([ids[1:2, n:], ids[1:2, :n]], 1)
        left_attn = torch.cat([attn[1:2, n:], attn[1:2, :n]], 1)
        alone = model(ids[1:2, :n], output_hidden_states=True).hidden_states[-1][0]
        assert relative_error(adapter.body(left, left_attn)[0, -n:], alone) <= 1e-5
        # A packed block: all ones, positions 0..S-1 across the documents it holds (group_texts).
        block = torch.tensor(pack_blocks([row[m.bool()].tolist() for row, m in zip(ids, attn)], 16))
        ones = torch.ones_like(block)
        assert relative_error(adapter.body(block, ones),
                              model(block, output_hidden_states=True).hidden_states[-1]) <= 1e-6
        assert (causal_labels(block, ones)[:, :-1] == block[:, 1:]).all()


# ------------------------------------------------------------------ the step against distiller.py's causal branch
@pytest.mark.parametrize("fused_head", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_causal_step_matches_distiller_causal_branch_in_float64(family, fused_head):
    teacher = tiny_causal(family, V)
    student = build_student(teacher, num_layers=2).train()
    teacher = _peaked(teacher)
    ref_student = copy.deepcopy(student).double()
    ids, attn = random_batch(V, 5, 16, cls_id=1, sep_id=2, pad_id=0, seed=1)
    assert (attn == 0).any()
    torch.manual_seed(0)  # the same dropout masks (tiny GPT-2 keeps p = 0.1) in both
    ref = distiller_causal_step(ref_student, copy.deepcopy(teacher).double(), ids, attn)
    ref[0].backward()

    heads = (dict(student_head=student.get_output_embeddings(), teacher_head=teacher.get_output_embeddings())
             if fused_head else {})
    torch.manual_seed(0)
    out = DistillationStep(StudentRows(student), teacher, DistillationLoss(**heads))(ids, attn,
                                                                                     causal_labels(ids, attn))
    out.total.backward()
    assert ref[1] > 0.05
    for got, want in zip(out, ref):
        assert relative_error(got, want) <= 1e-5
    _grads_match(student, ref_student)


@pytest.mark.parametrize("fused_head", [True, False])
def test_a_student_with_a_differently_padded_vocabulary_uses_the_real_one(fused_head):
    """Qwen-style padding: teacher head V + 14 rows, student V + 6; both are cut to the tokenizer's V
    rows by views (the heads' own storage), and the loss is distiller.py's on the first V logits."""
    teacher = _peaked(tiny_causal("llama", V + 14))
    student = tiny_causal("llama", V + 6, layers=2, seed=1).train()
    ref_student = copy.deepcopy(student).double()
    ids, attn = random_batch(V, 4, 12, cls_id=1, sep_id=2, pad_id=0, seed=3)
    ref = distiller_causal_step(ref_student, copy.deepcopy(teacher).double(), ids, attn, vocab_size=V)
    ref[0].backward()
    rows = StudentRows(student, V)
    step = DistillationStep(rows, teacher, DistillationLoss(), vocab_size=V)
    heads = {}
    if fused_head:
        heads = dict(student_head=rows.adapter.projection, teacher_head=step.teacher_adapter.projection)
        assert heads["student_head"].weight.data_ptr() == student.lm_head.weight.data_ptr()  # a view, no copy
        assert heads["teacher_head"].weight.shape == (V, 32)
    step.loss_fn = DistillationLoss(**heads)
    out = step(ids, attn, causal_labels(ids, attn))
    out.total.backward()
    for got, want in zip(out, ref):
        assert relative_error(got, want) <= 1e-5
    _grads_match(student, ref_student)
    assert (student.lm_head.weight.grad[V:] == 0).all()  # the padding rows are never predicted


@pytest.mark.parametrize("fused_head", [True, False])
def test_gemma2_soft_capped_logits_on_both_paths_match_distiller_causal_branch(fused_head):
    """Gemma2's final_logit_softcapping (c · tanh(s / c), in Gemma2ForCausalLM.forward, which the reference
    runs): the fused heads apply it per chunk, the logits path in the adapter's head; a cap of 5 on peaked
    logits, so that it matters."""
    teacher = tiny_causal("gemma2", V, final_logit_softcapping=5.0)
    student = build_student(teacher, num_layers=2).train()
    teacher = _peaked(teacher)
    ref_student = copy.deepcopy(student).double()
    ids, attn = random_batch(V, 4, 12, cls_id=1, sep_id=2, pad_id=0, seed=4)
    ref = distiller_causal_step(ref_student, copy.deepcopy(teacher).double(), ids, attn)
    ref[0].backward()
    rows = StudentRows(student)
    step = DistillationStep(rows, teacher, DistillationLoss())
    if fused_head:
        step.loss_fn = DistillationLoss(**fused_heads(rows.adapter, step.teacher_adapter))
        assert step.loss_fn.head_loss.logit_softcap == step.loss_fn.head_loss.teacher_logit_softcap == 5.0
    out = step(ids, attn, causal_labels(ids, attn))
    out.total.backward()
    for got, want in zip(out, ref):
        assert relative_error(got, want) <= 1e-5
    _grads_match(student, ref_student)
    uncapped = DistillationStep(StudentRows(student), teacher, DistillationLoss(
        student_head=student.lm_head, teacher_head=teacher.lm_head))(ids, attn, causal_labels(ids, attn))
    assert relative_error(uncapped.kl, ref[1]) > 1e-2  # the cap matters here: the test can fail


def test_logit_transform_reads_gemmas_cap_and_coheres_scale():
    from transformers import CohereConfig, Gemma2Config, LlamaConfig

    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform(Gemma2Config(final_logit_softcapping=None)) == (1.0, None)
    assert logit_transform(CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert logit_transform(LlamaConfig()) == (1.0, None)


# ------------------------------------------------------------------ distil-train end to end
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """GPT-2 (GPT-2's tokenizer: no pad token) and LLaMA teachers, a bigger student you bring (its own
    padded vocabulary), a Gemma2 teacher (soft-capped logits), a BERT teacher, and a corpus."""
    root = tmp_path_factory.mktemp("causal")
    gpt2_tok, bpe = gpt2_tokenizer(), roberta_tokenizer()
    models = {
        "gpt2": (tiny_causal("gpt2", len(gpt2_tok), max_positions=128), gpt2_tok),
        "llama": (tiny_causal("llama", len(bpe) + 8, max_positions=128), bpe),
        "llama_student": (tiny_causal("llama", len(bpe) + 2, layers=2, max_positions=128, seed=5), bpe),
        "llama_student_wide": (tiny_causal("llama", len(bpe), layers=2, hidden=48, max_positions=128), bpe),
        "llama_other_tokenizer": (tiny_causal("llama", len(gpt2_tok), layers=2, max_positions=128), gpt2_tok),
        "gemma2": (tiny_causal("gemma2", len(bpe), final_logit_softcapping=30.0), bpe),
        "bert": (tiny_bert(len(bert_tokenizer())), bert_tokenizer()),
    }
    for name, (model, tok) in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_corpus(root / "corpus", n_files=2, n_lines=60)
    return root


def argv(workdir, out, teacher, *flags):
    return ["--teacher", str(workdir / teacher), "--data", str(workdir / "corpus"), "--output-dir", str(workdir / out),
            "--batch-size", "8", "--grad-accum", "2", "--max-length", "64", "--max-steps", "2", "--log-every", "1",
            "--eval-every", "2", "--no-progress", *flags]


def _rows(workdir, out):
    return [json.loads(line) for line in (workdir / out / METRICS).read_text().splitlines()]


@pytest.mark.parametrize("teacher, flags", [
    ("gpt2", ["--block-size", "32"]),  # DistilGPT2's recipe: packed blocks, fused heads
    ("llama", ["--alpha-clm", "1.0", "--no-fused-head"]),  # padded per batch, logits
    ("gemma2", []),  # soft-capped logits, in the fused heads
])
def test_distil_train_on_a_causal_teacher(workdir, teacher, flags):
    out = f"run_{teacher}"
    assert main(argv(workdir, out, teacher, *flags)) == 0
    rows = _rows(workdir, out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["clm"] > 0 and r["kl"] > 0 and "mlm" not in r for r in train)
    assert any("eval_clm" in r and "eval_teacher_clm_accuracy" in r for r in rows)
    student = AutoModelForCausalLM.from_pretrained(workdir / out / STUDENT)
    assert student.config.num_hidden_layers == 2 and type(student).__name__ == type(
        AutoModelForCausalLM.from_pretrained(workdir / teacher)).__name__
    student.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert AutoModelForCausalLM.from_pretrained(workdir / out / "checkpoint-2") is not None


@pytest.mark.parametrize("fused_head", [True, False])
def test_distil_train_with_gkds_divergence_on_a_causal_teacher(workdir, fused_head):
    """--divergence jsd (GKD's loss): the logged kl is T² times a generalised JSD, bounded by T²·H(β)."""
    out = f"run_jsd_{fused_head}"
    flags = ["--divergence", "jsd", "--jsd-beta", "0.3", *([] if fused_head else ["--no-fused-head"])]
    assert main(argv(workdir, out, "llama", *flags)) == 0
    train = [r for r in _rows(workdir, out) if "loss" in r]
    bound = 4.0 * -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    assert [r["step"] for r in train] == [1, 2] and all(0 < r["kl"] <= bound and r["clm"] > 0 for r in train)


def test_distil_train_with_a_student_you_bring_and_a_padded_vocabulary(workdir):
    # Teacher head len(tok) + 8 rows, student len(tok) + 2: both cut to the tokenizer's vocabulary.
    assert main(argv(workdir, "brought", "llama", "--student", str(workdir / "llama_student"))) == 0
    saved = AutoModelForCausalLM.from_pretrained(workdir / "brought" / STUDENT)
    assert saved.lm_head.weight.shape[0] == len(roberta_tokenizer()) + 2


@pytest.mark.parametrize("teacher, flags, words", [
    ("gpt2", ["--alpha-mlm", "2"], ["alpha_mlm", "causal LM", "--alpha-clm"]),
    ("gpt2", ["--restrict-kl-to-mask"], ["restrict_kl_to_mask"]),
    ("gpt2", ["--as-distilbert"], ["as_distilbert"]),
    ("bert", ["--alpha-clm", "2"], ["alpha_clm", "masked LM", "--alpha-mlm"]),
    ("bert", ["--block-size", "32"], ["block_size", "masked LM"]),
    ("gpt2", ["--block-size", "256"], ["block_size", "256", "128 positions"]),
    ("llama", ["--student", "{workdir}/llama_student_wide"], ["alpha_cos", "48", "32", "--alpha-cos 0"]),
])
def test_wrong_flags_for_the_model_kind_are_one_line_before_any_model_loads(workdir, capsys, monkeypatch, teacher,
                                                                             flags, words):
    import distil.train

    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(distil.train, "_load_teacher", no_load)
    flags = [f.format(workdir=workdir) for f in flags]
    assert main(argv(workdir, "refused", teacher, *flags)) == EXIT_ERROR
    one_error_line(capsys, *words)
    assert not (workdir / "refused").exists()


def test_a_student_of_another_tokenizer_is_refused_naming_both(workdir, capsys):
    other = workdir / "llama_other_tokenizer"
    assert main(argv(workdir, "other_tok", "llama", "--student", str(other), "--alpha-cos", "0")) == EXIT_ERROR
    one_error_line(capsys, "tokenizer", str(other), str(workdir / "llama"))


# ------------------------------------------------------------------ resume (issue 21, item 8)
def test_causal_resume_is_bit_exact_across_an_epoch_boundary(workdir):
    """A causal run stopped at step 2 and resumed equals the straight run bit for bit: the packed blocks'
    order (the epoch's permutation), the dropout RNG (tiny GPT-2 keeps p = 0.1), AdamW and the schedule
    all travel in the checkpoint."""
    def config(out, **kw):
        return TrainConfig(teacher=str(workdir / "gpt2"), data=[str(workdir / "corpus")], output_dir=str(workdir / out),
                           block_size=64, batch_size=16, grad_accum=2, max_steps=4, save_every=100, log_every=1,
                           eval_fraction=0.0, progress=False, **kw)

    straight = Trainer(config("resume_straight"))
    assert len(straight.batches) < 4  # 4 steps cross an epoch boundary
    before = {k: v.clone() for k, v in straight.student.state_dict().items()}
    assert straight.fit() == "done"
    first = Trainer(config("resume_split"))
    assert first.fit(max_steps=2) == "done"
    resumed = Trainer(config("resume_split", resume=True))
    assert resumed.resumed_from == workdir / "resume_split" / "checkpoint-2"
    assert resumed.fit() == "done" and resumed.step == 4

    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    losses = [[(r["loss"], r["kl"], r["clm"], r["cos"]) for r in _rows(workdir, out) if "loss" in r]
              for out in ("resume_straight", "resume_split")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    saved = AutoModelForCausalLM.from_pretrained(workdir / "resume_split" / STUDENT)
    assert all(torch.equal(v, b[k]) for k, v in saved.state_dict().items())
