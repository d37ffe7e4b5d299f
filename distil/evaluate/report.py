"""``distil-eval``: the comparison of a teacher and its students (:class:`EvalConfig`, :func:`evaluate`),
its Markdown table and its command line (:func:`main`)."""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
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
from distil.evaluate.finetune import fine_tune
from distil.evaluate.labelled import label_names, load_labelled
from distil.evaluate.lm_metrics import causal_lm_metrics, lm_sequences, masked_lm_metrics
from distil.evaluate.models import count_parameters, head_note, load_classifier, load_lm, load_tokenizer
from distil.evaluate.throughput import classifier_throughput, forward_throughput, generation_throughput
from distil.student import causal_lm_directory

DESCRIPTION = ("Compare a teacher and its students: fine-tuning on a labelled set, held-out language-model scores, "
               "parameters and throughput")
PROMPT_TOKENS = 16  # generation prompts: each --lm-text sequence's first tokens (sequences have >= 12)


@dataclasses.dataclass
class EvalConfig:
    """Every option of ``distil-eval`` (the CLI flags are these names with dashes; ``--help`` lists each
    with its default)."""

    models: list[str] = _option(help="model directories (config, weights, tokenizer): masked or causal LMs; the "
                                     "first is the reference for retention and speed-ups")
    train: str | None = _option(None, "labelled training data: a .jsonl/.csv/.tsv file with a header, or a datasets "
                                      "folder (save_to_disk); required unless --lm-text is given (then without it "
                                      "nothing is fine-tuned)")
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
    lm_text: str | None = _option(None, "a held-out text file (one document per line): masked LMs' masked-token "
                                        "accuracy and loss, causal LMs' next-token perplexity and accuracy, and the "
                                        "LM forward throughput in tokens/s (default: not measured)")
    lm_max_length: int = _option(128, "tokens per sequence of --lm-text")
    mlm_prop: float = _option(0.15, "masked LMs: fraction of --lm-text's tokens masked")
    mlm_seed: int = _option(0, "masked LMs: seed of the masked positions")
    generate_tokens: int = _option(32, "causal LMs with --lm-text: tokens generated (greedy, KV cache) after each "
                                       "prompt for the generation throughput; 0: not measured")
    throughput_batch_size: int = _option(32, "batch size of the throughput measurements (and the number of "
                                             "generation prompts)")
    throughput_sequences: int = _option(256, "evaluation texts (or --lm-text sequences) timed for the throughput")
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
        for name in ("batch_size", "max_length", "lm_max_length", "throughput_batch_size",
                     "throughput_sequences", "throughput_rounds", "generate_tokens"):
            check_int(name, getattr(self, name), int(name != "generate_tokens"))
        if self.max_train_rows is not None:
            check_int("max_train_rows", self.max_train_rows, 2)
        check_positive_finite("epochs", self.epochs)
        check_positive_finite("lr", self.lr)
        check_fraction("warmup", self.warmup)
        check_mask_prop("mlm_prop", self.mlm_prop)
        if self.lm_text is not None and not Path(self.lm_text).is_file():
            raise ValueError(f"lm_text {self.lm_text!r} is not a file")
        if self.train is None:
            if self.lm_text is None:
                raise ValueError("train is required unless lm_text is given: name a labelled set to fine-tune on, "
                                 "a held-out text file to score the language models on, or both")
            if self.eval is not None:
                raise ValueError(f"eval {self.eval} is given without train: the labelled evaluation needs --train")
            return
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
    and warnings, unless ``verbose``; :func:`head_note` says what matters once per model."""
    from transformers.utils import logging as hf_logging

    if not verbose:
        hf_logging.set_verbosity_error()


def _labelled_sets(config):
    """(train, evaluation, labels) of the labelled flags; errors name the flag."""
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
    return train, evaluation, labels


def _fine_tuned(name, path, train, evaluation, labels, config):
    """One model's fine-tuning results over the seeds, and its classifier's parameter counts."""
    tokenizer = load_tokenizer(path)
    classifier, info = load_classifier(path, labels, tokenizer, loading_info=True)
    print(head_note(name, info), file=sys.stderr)
    runs = [fine_tune(path, train, evaluation, labels, seed, config) for seed in config.seeds]
    total, non_embedding = count_parameters(classifier)
    return {"params": total, "non_embedding_params": non_embedding,
            "accuracy": _summary([r["accuracy"] for r in runs]),
            "macro_f1": _summary([r["macro_f1"] for r in runs]) if len(labels) > 2 else None, "runs": runs}


def _language_model_scores(path, config):
    """``{"mlm": ...}`` or ``{"clm": ...}`` (None without an LM head) on ``--lm-text``, with the LM's
    parameter counts when nothing is fine-tuned."""
    if causal_lm_directory("models", path):
        scores = {"clm": causal_lm_metrics(path, config.lm_text, max_length=config.lm_max_length)}
    else:
        scores = {"mlm": masked_lm_metrics(path, config.lm_text, max_length=config.lm_max_length,
                                           mask_prop=config.mlm_prop, seed=config.mlm_seed)}
    if config.train is None:
        loaded = load_lm(path)
        if loaded is None:
            raise ValueError(f"models: {path} has no LM head (an encoder-only checkpoint): score it with --train")
        scores["params"], scores["non_embedding_params"] = count_parameters(loaded[0])
    return scores


def evaluate(config: EvalConfig):
    """Run the whole comparison; returns the results as a JSON-ready dict (see the package docstring)."""
    config.validate()
    _quiet_transformers(config.verbose)
    labelled = _labelled_sets(config) if config.train is not None else None
    names = config.names or [Path(p).name for p in config.models]

    results = []
    for name, path in zip(names, config.models):
        result = {"name": name, "path": str(path)}
        if labelled is not None:
            result.update(_fine_tuned(name, path, *labelled, config))
        if config.lm_text is not None:
            result.update(_language_model_scores(path, config))
        results.append(result)
    first = results[0]
    for result in results:
        result["params_ratio"] = result["params"] / first["params"]
    out = {"config": dataclasses.asdict(config), "machine": _machine(), "models": results}
    if labelled is not None:
        train, evaluation, labels = labelled
        texts = evaluation["text"][: config.throughput_sequences]
        rates = classifier_throughput(config.models, texts, labels, batch_size=config.throughput_batch_size,
                                      max_length=config.max_length, rounds=config.throughput_rounds)
        for result, rate in zip(results, rates):
            reference = first["accuracy"]["mean"]
            result["retention"] = result["accuracy"]["mean"] / reference if reference > 0 else None
            result["throughput_seq_s"] = rate
            result["speedup"] = rate / rates[0]
        out.update(labels=labels, train_rows=len(train), eval_rows=len(evaluation), throughput_sequences=len(texts))
    if config.lm_text is not None:
        out.update(_lm_throughput(config, results))
    return out


def _lm_throughput(config, results):
    """Forward tokens/s on ``--lm-text`` (and, when every model is causal, generated tokens/s) into each
    model's result; returns what the run records about the inputs."""
    tokenizer = load_tokenizer(config.models[0])  # the models share it: the comparison is on the same ids
    sequences = lm_sequences(config.lm_text, tokenizer, config.lm_max_length)[: config.throughput_sequences]
    rates = forward_throughput(config.models, sequences, tokenizer.pad_token_id,
                               batch_size=config.throughput_batch_size, rounds=config.throughput_rounds)
    for result, rate in zip(results, rates):
        result["forward_tokens_s"] = rate
        result["forward_speedup"] = rate / rates[0]
    recorded = {"lm_sequences": len(sequences), "lm_tokens": sum(map(len, sequences))}
    if config.generate_tokens and all("clm" in r for r in results):
        # One batch of prompts of a common length (no padding): each sequence's first tokens.
        prompts = sequences[: config.throughput_batch_size]
        length = min(PROMPT_TOKENS, *map(len, prompts))
        rates = generation_throughput(config.models, torch.tensor([s[:length] for s in prompts]),
                                      tokenizer.pad_token_id, new_tokens=config.generate_tokens,
                                      rounds=config.throughput_rounds)
        for result, rate in zip(results, rates):
            result["generate_tokens_s"] = rate
            result["generate_speedup"] = rate / rates[0]
        recorded.update(generate_prompts=len(prompts), generate_prompt_tokens=length)
    return recorded


def _pm(summary, scale=100.0):
    return f"{scale * summary['mean']:.2f} ± {scale * summary['std']:.2f}"


def markdown_table(results):
    """The Markdown table of :func:`evaluate`'s results (one row per model, the first is the reference):
    the fine-tuning columns with a labelled set, the language-model columns with ``--lm-text``."""
    models = results["models"]
    labelled = "labels" in results
    multiclass = labelled and len(results["labels"]) > 2
    with_mlm, with_clm = (any(kind in m for m in models) for kind in ("mlm", "clm"))
    with_generation = any("generate_tokens_s" in m for m in models)
    head = ["model", "params (M)", "non-emb. params (M)"]
    head += (["accuracy % (mean ± std)"] + ["macro-F1 %"] * multiclass + ["retention", "seq/s", "speed-up"]) * labelled
    head += ["MLM acc. %", "MLM loss"] * with_mlm + ["perplexity", "next-token acc. %"] * with_clm
    head += ["forward tok/s", "forward speed-up"] * ("forward_tokens_s" in models[0])
    head += ["generate tok/s", "generate speed-up"] * with_generation
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        row = [m["name"], f"{m['params'] / 1e6:.1f}", f"{m['non_embedding_params'] / 1e6:.1f}"]
        if labelled:
            row += [_pm(m["accuracy"])] + ([_pm(m["macro_f1"])] if multiclass else [])
            row += ["—" if m["retention"] is None else f"{100 * m['retention']:.1f}%",
                    f"{m['throughput_seq_s']:.1f}", f"{m['speedup']:.2f}×"]
        if with_mlm:
            mlm = m.get("mlm")
            row += ["—", "—"] if mlm is None else [f"{100 * mlm['accuracy']:.1f}", f"{mlm['loss']:.3f}"]
        if with_clm:
            clm = m.get("clm")
            row += ["—", "—"] if clm is None else [f"{clm['perplexity']:.2f}", f"{100 * clm['accuracy']:.1f}"]
        if "forward_tokens_s" in m:
            row += [f"{m['forward_tokens_s']:.0f}", f"{m['forward_speedup']:.2f}×"]
        if with_generation:
            row += [f"{m['generate_tokens_s']:.0f}", f"{m['generate_speedup']:.2f}×"]
        lines.append("| " + " | ".join(row) + " |")
    config, notes = results["config"], []
    if labelled:
        seeds = config["seeds"]
        notes.append(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {results['train_rows']} training / "
                     f"{results['eval_rows']} evaluation rows, {len(results['labels'])} classes; seq/s on "
                     f"{results['throughput_sequences']} evaluation sentences")
    if "lm_tokens" in results:
        notes.append(f"--lm-text: forward tok/s on {results['lm_sequences']} sequences ({results['lm_tokens']} tokens)"
                     + (f", generation of {config['generate_tokens']} tokens after {results['generate_prompts']} "
                        f"prompts of {results['generate_prompt_tokens']} tokens" if with_generation else ""))
    notes.append(f"ratios relative to {models[0]['name']}; batch {config['throughput_batch_size']}, "
                 f"{results['machine']['gpu'] or results['machine']['cpu']}.")
    return "\n".join(lines + ["", "; ".join(notes)])


EPILOG = """output: the Markdown table on stdout; progress and one line per model on stderr.

exit codes:
  0    finished
  1    error: a bad value, a missing or unreadable file, a bad row (one line on stderr naming the
       flag, the file and its line), checked before any model loads where it can be
  2    bad command line
"""


def parse_args(argv=None) -> EvalConfig:
    """CLI flags -> :class:`EvalConfig` (one flag per field, as distil-train's)."""
    parser = argparse.ArgumentParser(prog="distil-eval", description=DESCRIPTION, epilog=EPILOG,
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

