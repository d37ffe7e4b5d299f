"""Fine-tuning a model directory on a labelled set with the Hugging Face ``Trainer`` (the paper's GLUE /
IMDb protocol, ``run_glue.py``-style), and its scores: accuracy and macro-F1."""
import tempfile
import time

import torch

from distil.evaluate.models import load_classifier, load_tokenizer


def classification_metrics(predictions, references, num_labels):
    """Accuracy and macro-F1 (mean over classes of 2PR/(P+R), 0 for a class that is never predicted
    nor present) of integer ``predictions`` against ``references``; equivalent of scikit-learn's
    ``accuracy_score`` and ``f1_score(average="macro", labels=range(num_labels), zero_division=0)``."""
    predictions, references = torch.as_tensor(predictions), torch.as_tensor(references)
    if predictions.shape != references.shape or predictions.dim() != 1:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} must be equal 1-D shapes"
        )
    if references.numel() == 0:
        raise ValueError("references is empty")
    accuracy = (predictions == references).double().mean().item()
    f1s = []
    for c in range(num_labels):
        tp = ((predictions == c) & (references == c)).sum().item()
        denom = (predictions == c).sum().item() + (references == c).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_labels}


def fine_tune(model_path, train, evaluation, labels, seed, config):
    """Fine-tune ``model_path`` on ``train`` with the Hugging Face ``Trainer`` (AdamW, linear schedule
    with warm-up, dynamic padding) and score it on ``evaluation``. Returns accuracy, macro-F1 and the
    training time in seconds. The classification head's initialisation and the data order follow
    ``seed``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    tokenizer = load_tokenizer(model_path)
    label_id = {name: i for i, name in enumerate(labels)}

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=config.max_length)
        encoded["labels"] = [label_id[str(v)] for v in batch["label"]]
        return encoded

    train_set = train.map(encode, batched=True, remove_columns=train.column_names)
    eval_set = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names)
    set_seed(seed)  # before the head is created: its initialisation is part of the seed
    model = load_classifier(model_path, labels, tokenizer)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory(prefix="distil-eval-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=max(config.batch_size, 64),
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup,
            lr_scheduler_type="linear",
            seed=seed,
            data_seed=seed,
            train_sampling_strategy="group_by_length",
            bf16=use_bf16,
            dataloader_pin_memory=torch.cuda.is_available(),
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=not config.progress,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        # label_ids come back in the predictions' order (group_by_length reorders the evaluation too)
        output = trainer.predict(eval_set)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    metrics = classification_metrics(torch.as_tensor(logits).argmax(-1), torch.as_tensor(output.label_ids), len(labels))
    return {"seed": seed, **metrics, "train_seconds": seconds}
