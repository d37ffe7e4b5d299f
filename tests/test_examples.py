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
