"""Compare a teacher and its students downstream: ``distil-eval`` / ``python -m distil.evaluate``.

Every model directory (the first is the reference, normally the teacher) is fine-tuned identically on
a labelled text-classification set with ``AutoModelForSequenceClassification`` and the Hugging Face
``Trainer``, once per seed, and scored on a held-out split. The report, one row per model:

- accuracy (and macro-F1 when there are more than two classes), mean ± sample std over the seeds;
- retention: the model's mean accuracy over the first model's;
- parameter counts (all, and without the embedding tables);
- inference throughput in sequences/s on the same eval sentences, same batches, same machine (models
  timed in alternation, the median of several rounds), and its ratio to the first model's;
- optionally, the masked-LM accuracy and loss on a held-out text file: uniform masking of
  ``--mlm-prop`` of the tokens (all replaced by the mask token), drawn with a fixed seed.

It prints a Markdown table and writes the full results as JSON (``--output``). The paper's
equivalent is its GLUE/IMDb fine-tuning with ``run_glue.py``-style scripts (also the ``Trainer``).
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from distil.checks import (
    check_fraction,
    check_int,
    check_mask_prop,
    check_model_dir,
    check_positive_finite,
)
from distil.config import _add_flag, _option
from distil.data import load_corpus
from distil.masking import MLMMasker

LABELLED_SUFFIXES = (".jsonl", ".csv", ".tsv")


# -- labelled data -------------------------------------------------------------------------------
def _read_rows(path, text_column, label_column):
    """(texts, labels) of a .jsonl / .csv / .tsv file; errors name the file and line."""
    rows = []  # (line number, row)
    with open(path, encoding="utf-8", newline="" if path.suffix.lower() != ".jsonl" else None) as f:
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: a JSON object per line expected, got {type(row).__name__}")
                rows.append((number, row))
        else:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = [(reader.line_num, row) for row in reader]
    for number, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                raise ValueError(f"{path}:{number}: no column {column!r} (columns: {sorted(k for k in row if k)})")
        _check_label(row[label_column], f"{path}:{number}", label_column)
    return [row[text_column] for _, row in rows], [row[label_column] for _, row in rows]


def _check_label(value, where, label_column):
    """A null or blank label is a missing value, not a class of its own."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: empty {label_column!r} ({value!r}); every row needs a label")


def load_labelled(path, *, text_column="text", label_column="label", split=None):
    """A ``datasets.Dataset`` with columns ``text`` (str) and ``label`` (as stored) from ``path``:
    a ``.jsonl``, ``.csv`` or ``.tsv`` file with a header naming ``text_column`` and ``label_column``,
    or a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` needs ``split``).
    Equivalent of ``datasets.load_dataset("json"/"csv", data_files=path)`` (or ``load_from_disk``)
    followed by ``select_columns`` and renaming, without touching the datasets cache."""
    import datasets

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    path = Path(path)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise ValueError(f"{path} holds splits {sorted(loaded)}; name one with split (got {split!r})")
            loaded = loaded[split]
        missing = {text_column, label_column} - set(loaded.column_names)
        if missing:
            raise ValueError(f"{path}: no column {sorted(missing)} (columns: {loaded.column_names})")
        texts, labels = loaded[text_column], loaded[label_column]
        for i, label in enumerate(labels):
            _check_label(label, f"{path}: row {i}", label_column)
    elif path.is_file():
        if path.suffix.lower() not in LABELLED_SUFFIXES:
            raise ValueError(f"path {str(path)!r} must end in one of {LABELLED_SUFFIXES} or be a dataset folder")
        texts, labels = _read_rows(path, text_column, label_column)
    else:
        raise ValueError(f"path {str(path)!r} is neither a file nor a folder")
    if not texts:
        raise ValueError(f"{path} has no rows")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {i} has a non-text {text_column!r}: {text!r}")
    return datasets.Dataset.from_dict({"text": list(texts), "label": list(labels)})


def label_names(train, evaluation):
    """The sorted distinct labels of ``train`` (as strings); every ``evaluation`` label must be one."""
    names = sorted({str(v) for v in train["label"]})
    if len(names) < 2:
        raise ValueError(f"train must hold at least two distinct labels, got {names}")
    unknown = sorted({str(v) for v in evaluation["label"]} - set(names))
    if unknown:
        raise ValueError(f"evaluation labels {unknown} do not occur in train ({names})")
    return names


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


# -- models --------------------------------------------------------------------------------------
def count_parameters(model):
    """(all parameters, parameters outside ``nn.Embedding`` tables), each shared tensor counted once."""
    seen, total, embedding = set(), 0, 0
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        embedding += p.numel() if id(p) in embedding_ids else 0
    return total, total - embedding


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _classifier(path, labels, loading_info=False):
    """The sequence classifier of ``path`` (with ``loading_info``: and what transformers' load report
    says, ``{"missing_keys": ..., ...}``)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        trust_remote_code=False,
        output_loading_info=loading_info,
    )


def _head_note(name, info):
    """One line per model instead of transformers' load report: which weights the classifier added
    (the freshly initialised head) and how many of the checkpoint's it left out (e.g. its LM head)."""
    added = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    unused = len(info["unexpected_keys"])
    return (f"distil-eval: {name}: classification head added ({', '.join(added) or 'none'}); "
            f"{unused} checkpoint weights unused")


def fine_tune(model_path, train, evaluation, labels, seed, config):
    """Fine-tune ``model_path`` on ``train`` with the Hugging Face ``Trainer`` (AdamW, linear schedule
    with warm-up, dynamic padding) and score it on ``evaluation``. Returns accuracy, macro-F1 and the
    training time in seconds. The classification head's initialisation and the data order follow
    ``seed``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    tokenizer = _tokenizer(model_path)
    label_id = {name: i for i, name in enumerate(labels)}

    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=config.max_length)
        encoded["labels"] = [label_id[str(v)] for v in batch["label"]]
        return encoded

    train_set = train.map(encode, batched=True, remove_columns=train.column_names)
    eval_set = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names)
    set_seed(seed)  # before the head is created: its initialisation is part of the seed
    model = _classifier(model_path, labels)
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


def throughput(model_paths, texts, labels, *, batch_size, max_length, rounds):
    """Inference sequences/s of each model's classifier on ``texts`` (batches of ``batch_size``,
    padded to the longest in the batch, truncated at ``max_length``), in eval mode under
    ``torch.inference_mode``. The models run in alternation for ``rounds`` rounds after one
    warm-up batch each, and each reports its median round, so a load change on the machine hits
    every model alike."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = []
    for path in model_paths:
        tokenizer = _tokenizer(path)
        model = _classifier(path, labels).to(device).eval()
        batches = [
            tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            for i in range(0, len(texts), batch_size)
        ]
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        prepared.append((model, batches))
    rates = [[] for _ in model_paths]
    with torch.inference_mode():
        for model, batches in prepared:
            model(**batches[0])
        for _ in range(rounds):
            for rate, (model, batches) in zip(rates, prepared):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for batch in batches:
                    model(**batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rate.append(len(texts) / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


def masked_lm_metrics(model_path, text_path, *, max_length=128, mask_prop=0.15, seed=0, batch_size=32):
    """Masked-token accuracy and mean cross-entropy of ``model_path``'s masked-LM head on the text
    file ``text_path`` (one document per line, cut into sequences as :func:`distil.data.load_corpus`
    does). ``mask_prop`` of each batch's non-special tokens are drawn uniformly with a generator
    seeded ``seed`` and all replaced by the mask token, so models sharing a tokenizer see the same
    positions. Returns None when the directory has no masked-LM head (an encoder-only checkpoint),
    else ``{"accuracy", "loss", "masked_tokens"}``. Equivalent of ``AutoModelForMaskedLM`` with
    ``DataCollatorForLanguageModeling(mlm_probability=mask_prop)`` at 100% ``[MASK]``, loss summed
    over the masked tokens then divided by their number."""
    from transformers import AutoModelForMaskedLM

    tokenizer = _tokenizer(model_path)
    model, info = AutoModelForMaskedLM.from_pretrained(model_path, output_loading_info=True, trust_remote_code=False)
    if info["missing_keys"]:  # a fresh (random) head would score noise, not the model
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    sequences = load_corpus([text_path], tokenizer, max_length=max_length)
    if not sequences:
        raise ValueError(f"mlm text {text_path}: no sequence survived tokenisation and filtering")
    vocab = len(tokenizer)
    masker = MLMMasker(
        vocab, tokenizer.all_special_ids, tokenizer.mask_token_id,
        mask_prop=mask_prop, word_mask=1.0, word_keep=0.0, word_rand=0.0, smoothing=0.0,
    )
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.int64)
            attention_mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                attention_mask[row, : len(seq)] = 1
            masked, labels = masker(ids, attention_mask, generator)
            logits = model(input_ids=masked.to(device), attention_mask=attention_mask.to(device)).logits.float()
            chosen = labels.to(device) != -100
            rows, targets = logits[chosen], labels.to(device)[chosen]
            loss_sum += torch.nn.functional.cross_entropy(rows, targets, reduction="sum").item()
            correct += (rows.argmax(-1) == targets).sum().item()
            count += targets.numel()
    if count == 0:
        return {"accuracy": 0.0, "loss": 0.0, "masked_tokens": 0}
    return {"accuracy": correct / count, "loss": loss_sum / count, "masked_tokens": count}


# -- the run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalConfig:
    """Every option of ``distil-eval`` (the CLI flags are these names with dashes; ``--help`` lists each
    with its default)."""

    models: list[str] = _option(help="model directories (config, weights, tokenizer); the first is the reference "
                                     "for retention and speed-up")
    train: str = _option(help="labelled training data: a .jsonl/.csv/.tsv file with a header, or a datasets "
                              "folder (save_to_disk)")
    eval: str | None = _option(None, "labelled evaluation data, as --train; may be left out only when --train is a "
                                     "DatasetDict folder (its --eval-split is used)")
    names: list[str] | None = _option(None, "a display name per model (default: the folder names)")
    train_split: str = _option("train", "split of a DatasetDict --train")
    eval_split: str = _option("test", "split of a DatasetDict --eval (or of --train without --eval)")
    text_column: str = _option("text", "column holding the text")
    label_column: str = _option("label", "column holding the label (any value; empty or null is an error)")
    seeds: list[int] = _option([0, 1, 2], "fine-tuning seeds, distinct (repeating the flag adds seeds)")
    epochs: float = _option(3.0, "fine-tuning epochs")
    batch_size: int = _option(32, "fine-tuning batch size")
    lr: float = _option(5e-5, "fine-tuning peak learning rate (AdamW, linear schedule)")
    weight_decay: float = _option(0.01, "AdamW weight decay")
    warmup: float = _option(0.1, "fraction of the steps with a linear warm-up")
    max_length: int = _option(128, "tokens per text (longer ones are truncated)")
    max_train_rows: int | None = _option(None, "use at most this many training rows, drawn with seed 0 "
                                               "(default: all)")
    mlm_text: str | None = _option(None, "a text file for the masked-LM accuracy and loss (default: not measured)")
    mlm_max_length: int = _option(128, "tokens per sequence of --mlm-text")
    mlm_prop: float = _option(0.15, "fraction of --mlm-text's tokens masked")
    mlm_seed: int = _option(0, "seed of the masked-LM positions")
    throughput_batch_size: int = _option(32, "batch size of the throughput measurement")
    throughput_sequences: int = _option(256, "evaluation texts timed for the throughput")
    throughput_rounds: int = _option(5, "timed rounds (the median is reported)")
    output: str | None = _option(None, "also write the full results as JSON to this file")
    progress: bool = _option(False, "show the Trainer's progress bars")
    verbose: bool = _option(False, "show transformers' own load reports and warnings (default: one line per model)")

    def validate(self):
        """Every value and path checked before any model loads; errors name the flag (and file)."""
        if not self.models:
            raise ValueError("models must name at least one model directory")
        for path in self.models:
            if not Path(path).is_dir():
                raise ValueError(f"models: {path!r} is not a model directory")
            check_model_dir("models", path, tokenizer=True)
        if self.names is not None and len(self.names) != len(self.models):
            raise ValueError(f"names has {len(self.names)} entries but models has {len(self.models)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name in ("batch_size", "max_length", "mlm_max_length", "throughput_batch_size",
                     "throughput_sequences", "throughput_rounds"):
            check_int(name, getattr(self, name), 1)
        if self.max_train_rows is not None:
            check_int("max_train_rows", self.max_train_rows, 2)
        check_positive_finite("epochs", self.epochs)
        check_positive_finite("lr", self.lr)
        check_fraction("warmup", self.warmup)
        check_mask_prop("mlm_prop", self.mlm_prop)
        if self.mlm_text is not None and not Path(self.mlm_text).is_file():
            raise ValueError(f"mlm_text {self.mlm_text!r} is not a file")
        for name in ("train", "eval"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ValueError(f"{name}: {path!r} is neither a file nor a folder")
        if self.eval is None and not (Path(self.train) / "dataset_dict.json").is_file():
            raise ValueError(f"eval is required: --train {self.train} has no --eval-split of its own, and scoring "
                             "on the training rows would say nothing (pass --eval, the same file if you mean it)")


def _summary(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _quiet_transformers(verbose):
    """transformers' load reports (a table of UNEXPECTED / MISSING keys per load: one per model and seed)
    and warnings, unless ``verbose``; :func:`_head_note` says what matters once per model."""
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.set_verbosity_error()


def evaluate(config: EvalConfig):
    """Run the whole comparison; returns the results as a JSON-ready dict (see the module docstring)."""
    config.validate()
    _quiet_transformers(config.verbose)
    data = {}
    for flag, path, split in (("train", config.train, config.train_split),
                              ("eval", config.eval or config.train, config.eval_split)):
        try:
            data[flag] = load_labelled(path, text_column=config.text_column, label_column=config.label_column,
                                       split=split)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    train, evaluation = data["train"], data["eval"]
    if config.max_train_rows is not None and len(train) > config.max_train_rows:
        train = train.shuffle(seed=0).select(range(config.max_train_rows))
    try:
        labels = label_names(train, evaluation)
    except ValueError as err:
        raise ValueError(f"train {config.train}, eval {config.eval or config.train}: {err}") from None
    names = config.names or [Path(p).name for p in config.models]

    results = []
    for name, path in zip(names, config.models):
        classifier, info = _classifier(path, labels, loading_info=True)
        print(_head_note(name, info), file=sys.stderr)
        runs = [fine_tune(path, train, evaluation, labels, seed, config) for seed in config.seeds]
        total, non_embedding = count_parameters(classifier)
        results.append({
            "name": name,
            "path": str(path),
            "params": total,
            "non_embedding_params": non_embedding,
            "accuracy": _summary([r["accuracy"] for r in runs]),
            "macro_f1": _summary([r["macro_f1"] for r in runs]) if len(labels) > 2 else None,
            "runs": runs,
        })
        if config.mlm_text is not None:
            results[-1]["mlm"] = masked_lm_metrics(
                path, config.mlm_text, max_length=config.mlm_max_length, mask_prop=config.mlm_prop,
                seed=config.mlm_seed,
            )
    texts = evaluation["text"][: config.throughput_sequences]
    rates = throughput(config.models, texts, labels, batch_size=config.throughput_batch_size,
                       max_length=config.max_length, rounds=config.throughput_rounds)
    first = results[0]
    for result, rate in zip(results, rates):
        reference = first["accuracy"]["mean"]
        result["retention"] = result["accuracy"]["mean"] / reference if reference > 0 else None
        result["throughput_seq_s"] = rate
        result["speedup"] = rate / rates[0]
        result["params_ratio"] = result["params"] / first["params"]
    return {
        "config": dataclasses.asdict(config),
        "machine": _machine(),
        "labels": labels,
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "throughput_sequences": len(texts),
        "models": results,
    }


def _pm(summary, scale=100.0):
    return f"{scale * summary['mean']:.2f} ± {scale * summary['std']:.2f}"


def markdown_table(results):
    """The Markdown table of :func:`evaluate`'s results (one row per model, the first is the reference)."""
    models = results["models"]
    multiclass = len(results["labels"]) > 2
    with_mlm = any("mlm" in m for m in models)
    head = ["model", "params (M)", "non-emb. params (M)", "accuracy % (mean ± std)"]
    head += ["macro-F1 %"] if multiclass else []
    head += ["retention", "seq/s", "speed-up"]
    head += ["MLM acc. %", "MLM loss"] if with_mlm else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        row = [m["name"], f"{m['params'] / 1e6:.1f}", f"{m['non_embedding_params'] / 1e6:.1f}", _pm(m["accuracy"])]
        row += [_pm(m["macro_f1"])] if multiclass else []
        row += [
            "—" if m["retention"] is None else f"{100 * m['retention']:.1f}%",
            f"{m['throughput_seq_s']:.1f}",
            f"{m['speedup']:.2f}×",
        ]
        if with_mlm:
            mlm = m.get("mlm")
            row += ["—", "—"] if mlm is None else [f"{100 * mlm['accuracy']:.1f}", f"{mlm['loss']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    seeds = results["config"]["seeds"]
    lines.append("")
    lines.append(
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {results['train_rows']} training / "
        f"{results['eval_rows']} evaluation rows, {len(results['labels'])} classes; retention and speed-up "
        f"relative to {models[0]['name']}; throughput on {results['throughput_sequences']} evaluation "
        f"sentences, batch {results['config']['throughput_batch_size']}, "
        f"{results['machine']['gpu'] or results['machine']['cpu']}."
    )
    return "\n".join(lines)


EPILOG = """output: the Markdown table on stdout; progress and one line per model on stderr.

exit codes:
  0    finished
  1    error: a bad value, a missing or unreadable file, a bad row (one line on stderr naming the
       flag, the file and its line), checked before any model loads where it can be
  2    bad command line
"""


def parse_args(argv=None) -> EvalConfig:
    """CLI flags -> :class:`EvalConfig` (one flag per field, as distil-train's)."""
    parser = argparse.ArgumentParser(prog="distil-eval", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(EvalConfig):
        _add_flag(parser, field)
    return EvalConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    """Console entry point ``distil-eval`` (also ``python -m distil.evaluate``); returns the exit code."""
    config = parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's and the loaders' chatter; stdout is the table
            results = evaluate(config)
    except (ValueError, TypeError, OSError) as err:
        print(f"distil-eval: error: {err}", file=sys.stderr)
        return 1
    print(markdown_table(results))
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
