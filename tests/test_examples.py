"""The drop-in examples (examples/): DistillationLoss in a Hugging Face Trainer's compute_loss and in
a plain PyTorch loop. Each step's loss must equal distiller.py's eager step in float64."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from distil.data import LengthGroupedBatches
from distil.masking import MLMMasker
from distil.reference import distiller_step
from distil.student import build_student

from helpers import relative_error
from tiny import bert_tokenizer, random_batch, tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _models():
    tok = bert_tokenizer()
    teacher = tiny_bert(len(tok), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = build_student(teacher)
    with torch.no_grad():  # a teacher far from the student, so the KL is not a rounding residue
        teacher.cls.predictions.bias.copy_(3.0 * torch.randn(len(tok)))
    return tok, teacher, student


def _sequences(tok, n=24):
    ids, attn = random_batch(len(tok), n, 20, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id,
                             pad_id=tok.pad_token_id, seed=2)
    return [row[mask.bool()].tolist() for row, mask in zip(ids, attn)]


def test_hf_trainer_compute_loss_equals_distiller_step_and_trains(tmp_path):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    example = _load("hf_trainer_distillation")
    tok, teacher, student = _models()
    ref_student, ref_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, dataloader_num_workers=0, seed=0)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    trainer = example.DistillationTrainer(model=student, teacher=teacher, args=args, data_collator=collator,
                                          train_dataset=[{"input_ids": s} for s in _sequences(tok)])

    batch = collator([{"input_ids": s} for s in _sequences(tok, 8)])
    assert (batch["labels"] != -100).any() and (batch["attention_mask"] == 0).any()
    ours = trainer.compute_loss(student, batch)
    ref = distiller_step(ref_student, ref_teacher, batch["input_ids"], batch["attention_mask"], batch["labels"],
                     restrict_kl_to_mask=False)[0]
    assert relative_error(ours, ref) <= 1e-5

    before = [p.detach().clone() for p in student.parameters()]
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_plain_loop_step_equals_distiller_step_and_trains():
    example = _load("plain_loop_distillation")
    tok, teacher, student = _models()
    ref_student, ref_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    masker = MLMMasker(len(tok), tok.all_special_ids, tok.mask_token_id)
    batches = LengthGroupedBatches(_sequences(tok), 8, seed=0, pad_id=tok.pad_token_id)
    first = next(iter(LengthGroupedBatches(_sequences(tok), 8, seed=0, pad_id=tok.pad_token_id)))
    ids, labels = masker(first["input_ids"], first["attention_mask"], torch.Generator().manual_seed(7))
    ref = distiller_step(ref_student, ref_teacher, ids, first["attention_mask"], labels, restrict_kl_to_mask=False)

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    history = example.distill(student, teacher, batches, masker, optimizer, steps=3, seed=7)
    assert len(history) == 3
    for got, want in zip(history[0], ref):
        assert relative_error(torch.tensor(got), want.detach()) <= 1e-5
    assert history[-1] != history[0]  # the student moved


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused_heads", "logits"])
@pytest.mark.parametrize("beta", [0.5, 0.1, 1.0])
def test_trl_gkd_trainer_loss_is_trls_generalized_jsd_and_trains(tmp_path, fused_head, beta):
    """examples/trl_gkd_distillation.py: DistilGKDTrainer's loss and gradients are TRL's own
    GKDTrainer.generalized_jsd_loss on the same batch (fp32), with and without num_items_in_batch, and
    the trainer trains."""
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    example = _load("trl_gkd_distillation")
    trainer = example.build_trainer(tmp_path, beta=beta, fused_head=fused_head)
    student, teacher = trainer.model, trainer.teacher_model
    batch = example.collate(example.prompt_completion_rows(student.config.vocab_size, n=4, seed=1))
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for num_items in (None, 37):
        student.zero_grad()
        ours = trainer.compute_loss(student, batch, num_items_in_batch=num_items)
        ours.backward()
        our_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attn).logits
        s = student(input_ids=ids, attention_mask=attn).logits
        trl = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=beta,
                                              num_items_in_batch=num_items)
        trl.backward()
        assert trl > 1e-2  # far-apart models: the comparison can fail
        assert relative_error(ours, trl) <= 1e-5
        for ours_grad, p in zip(our_grads, student.parameters()):
            assert relative_error(ours_grad, p.grad) <= 1e-4
    before = [p.detach().clone() for p in student.parameters()]
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
