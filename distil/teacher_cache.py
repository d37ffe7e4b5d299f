"""Offline teacher: run the teacher once over the corpus, store its top-k logits, train students from them.

``distil-cache-teacher --teacher DIR --data PATH... --output CACHE [--top-k 64] [--passes 3]
[--temperature 2.0] [--hidden]`` (also ``python -m distil.teacher_cache``) builds a cache;
``distil-train --teacher-cache CACHE`` trains from it without loading the teacher, with
:func:`distil.fused_loss.topk_kl_ce_loss` in exact mode (the cached lse at the cache temperature).

Masking: the teacher must see exactly the student's masked input, so the cache fixes the masking.
Pass ``p`` masks every sequence once with the trainer's masker (:class:`distil.masking.MLMMasker`
with the corpus' token counts, the paper's 15% / 80-10-10 / smoothing 0.7), shard by shard with a
generator seeded from (seed, p, shard), and stores the masked ids and labels beside the teacher's
outputs; training epoch ``e`` replays pass ``e mod passes``.

Per token the cache holds: the masked id and label (int16 when the tokenizer has <= 32767 ids, else
int32; label -100 where not masked), the teacher's k largest logits at T = 1 (``--dtype``: float16 by
default, bfloat16, or float32) and their vocabulary indices (int16 when V <= 32767, else int32), the
full-vocabulary ``logsumexp(logits / T)`` at the cache temperature (float32), and with ``--hidden``
the last hidden state (float16). At k = 64, float16, int16 that is 2 + 2 + 64 * (2 + 2) + 4 = 264
bytes per token per pass.

Layout of CACHE/ (format ``distil-teacher-cache`` version 1)::

    index.json                     metadata (teacher, tokenizer, k, T, passes, dtypes, masking, corpus
                                   files with sizes and sha256) and the shard table; "complete" is
                                   true once every shard is written
    lengths.npy                    int32 [sequences]: tokens per sequence (pass-independent)
    pass{p}/shard{s:05d}/{input_ids,labels,topk_logits,topk_index,lse[,hidden]}.npy
                                   the tokens of sequences [s * shard_sequences, ...) of pass p,
                                   concatenated without padding; [tokens] or [tokens, k] / [tokens, H]

Why ``.npy`` shards and not safetensors: numpy is already a dependency, ``np.load(mmap_mode="r")``
maps a shard without reading it (a batch touches only its own rows' pages), the header is a short
fixed-format text so the bytes depend only on the data (resumed builds are byte-identical), and
one file per field keeps each array contiguous and typed. numpy has no bfloat16: bfloat16 logits
are stored as their int16 bit patterns and ``index.json`` names the dtype.

A shard is written into ``<shard>.tmp/`` (each file flushed and fsynced) and renamed into place, so
a shard directory is either complete or absent. An interrupted build (Ctrl-C, a kill, a crash)
resumes with the same command: finished shards are kept, a partial one is redone, and the result is
byte-identical to an uninterrupted build (every shard depends only on its own sequences, seed and
pass; the teacher runs deterministically on the same machine).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distil._ops.common import check_positive_finite
from distil.data import load_corpus, text_files
from distil.masking import MLMMasker, token_counts
from distil.ops import masked_gather
from distil.student import lm_adapter

FORMAT = "distil-teacher-cache"
VERSION = 1
INDEX = "index.json"
LENGTHS = "lengths.npy"
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT16_MAX = 32767
# The trainer's (and the paper's) masking: 15% of the tokens, 80/10/10, count^-0.7 smoothing.
MASKING = {"mask_prop": 0.15, "word_mask": 0.8, "word_keep": 0.1, "word_rand": 0.1, "smoothing": 0.7}


def _int_dtype(size):
    """int16 when every id / index (and -100) fits, else int32."""
    return "int16" if size <= INT16_MAX + 1 else "int32"


def field_dtypes(tokenizer_size, vocab_size, logits_dtype="float16", hidden=False):
    """{field: stored dtype name} of a cache (see the module docstring)."""
    return {"input_ids": _int_dtype(tokenizer_size), "labels": _int_dtype(tokenizer_size),
            "topk_logits": logits_dtype, "topk_index": _int_dtype(vocab_size), "lse": "float32",
            **({"hidden": "float16"} if hidden else {})}


def bytes_per_token(top_k, tokenizer_size, vocab_size, logits_dtype="float16", hidden_size=None):
    """Cache bytes per token and pass (the .npy headers aside): 264 at k = 64, float16, V <= 32767."""
    dtypes = field_dtypes(tokenizer_size, vocab_size, logits_dtype, hidden_size is not None)
    width = {"topk_logits": top_k, "topk_index": top_k, "hidden": hidden_size or 0}
    return sum(width.get(name, 1) * getattr(torch, dtype).itemsize for name, dtype in dtypes.items())


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_npy(path, array):
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _to_numpy(t, dtype_name):
    """A tensor as the numpy array stored for ``dtype_name`` (bfloat16 as its int16 bits)."""
    t = t.contiguous().cpu()
    if dtype_name == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return t.to(getattr(torch, dtype_name)).numpy()


def _from_numpy(a, dtype_name):
    t = torch.from_numpy(np.array(a))  # a copy: the mapped pages are read-only
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def _shard_name(pass_index, shard):
    return f"pass{pass_index}/shard{shard:05d}"


def _mask_seed(seed, pass_index, shard):
    # Distinct for every (seed, pass, shard) with pass < 2**16 and shard < 2**24.
    return (seed << 40) | (pass_index << 24) | shard


class CacheBuilder:
    """Builds (or resumes) a cache; :func:`build_cache` is the function form, ``main`` the CLI."""

    def __init__(self, teacher, data, output, *, top_k=64, passes=3, temperature=2.0, hidden=False,
                 dtype="float16", max_length=512, batch_size=32, shard_sequences=1024, seed=56, device=None,
                 progress=True):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        for name, value, low in (("top_k", top_k, 1), ("passes", passes, 1), ("batch_size", batch_size, 1),
                                 ("shard_sequences", shard_sequences, 1), ("seed", seed, 0),
                                 ("max_length", max_length, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if passes >= 1 << 16 or seed >= 1 << 23:
            raise ValueError("passes must be < 65536 and seed < 2**23")
        self.temperature = check_positive_finite("temperature", temperature)
        if dtype not in LOGIT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(LOGIT_DTYPES)}, got {dtype!r}")
        if not Path(teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {str(teacher)!r}")
        self.output = Path(output)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.shard_sequences, self.seed = batch_size, shard_sequences, seed
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)
        model = AutoModelForMaskedLM.from_pretrained(teacher, use_safetensors=True, trust_remote_code=False)
        self.teacher = model.requires_grad_(False).eval().to(self.device)
        self.adapter = lm_adapter(self.teacher)
        vocab_out = self.teacher.config.vocab_size
        if top_k > vocab_out:
            raise ValueError(f"top_k must be <= the teacher's vocabulary size {vocab_out}, got {top_k}")
        files = text_files(data)
        self.sequences = load_corpus(files, self.tokenizer, max_length=max_length)
        if not self.sequences:
            raise ValueError("data: no sequence survived tokenisation and filtering")
        vocab = len(self.tokenizer)
        self.masker = MLMMasker(vocab, special_ids=self.tokenizer.all_special_ids,
                                mask_id=self.tokenizer.mask_token_id, counts=token_counts(self.sequences, vocab),
                                **MASKING)
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int32)
        num_shards = -(-len(self.sequences) // shard_sequences)
        self.index = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": {"path": str(Path(teacher).resolve()), "class": type(self.teacher).__name__,
                        "vocab_size": vocab_out, "hidden_size": self.teacher.config.hidden_size,
                        "config_sha256": _sha256(Path(teacher) / "config.json")},
            "tokenizer": {"path": str(Path(teacher).resolve()), "class": type(self.tokenizer).__name__,
                          "size": vocab},
            "top_k": top_k,
            "temperature": self.temperature,
            "passes": passes,
            "dtypes": field_dtypes(vocab, vocab_out, dtype, hidden),
            "masking": {"seed": seed, **MASKING},
            "max_length": max_length,
            "corpus": [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size, "sha256": _sha256(f)}
                       for f in files],
            "num_sequences": len(self.sequences),
            "num_tokens": int(self.lengths.sum()),
            "shard_sequences": shard_sequences,
            "shards": [{"name": _shard_name(p, s), "pass": p, "first_sequence": s * shard_sequences,
                        "num_sequences": min(shard_sequences, len(self.sequences) - s * shard_sequences)}
                       for p in range(passes) for s in range(num_shards)],
            "complete": False,
        }

    def _prepare_output(self):
        """Create the cache directory, or check that the one there is this build's (to resume it)."""
        index_path = self.output / INDEX
        if index_path.exists():
            existing = json.loads(index_path.read_text())
            mine = dict(self.index, complete=existing.get("complete"))
            if existing != mine:
                changed = sorted(k for k in set(existing) | set(mine) if existing.get(k) != mine.get(k))
                raise ValueError(f"output {str(self.output)!r} holds a different cache (differs in {changed}); "
                                 "remove it or choose another --output")
            return existing["complete"]
        if self.output.exists() and any(self.output.iterdir()):
            raise ValueError(f"output {str(self.output)!r} exists and is not a teacher cache")
        self.output.mkdir(parents=True, exist_ok=True)
        _write_npy(self.output / LENGTHS, self.lengths)
        _write_json(index_path, self.index)
        return False

    @torch.no_grad()
    def _teacher_outputs(self, ids, attn):
        """(top-k values, top-k indices, lse at T, hidden or None) of the non-pad tokens, row-major."""
        autocast = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = self.adapter.body(ids, attn)
            rows = masked_gather(hidden, attn.bool())[0]
            logits = self.adapter.head(rows).float()
        values, index = logits.topk(self.index["top_k"], dim=-1)
        lse = torch.logsumexp(logits / self.temperature, dim=-1)
        return values, index, lse, (rows if "hidden" in self.index["dtypes"] else None)

    def _build_shard(self, shard, bar):
        first, count, pass_index = shard["first_sequence"], shard["num_sequences"], shard["pass"]
        seqs = [torch.as_tensor(s, dtype=torch.int64) for s in self.sequences[first:first + count]]
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.zeros(count, width, dtype=torch.int64)
        attn = (torch.arange(width) < lengths[:, None]).long()
        ids[attn.bool()] = torch.cat(seqs)
        generator = torch.Generator().manual_seed(_mask_seed(self.seed, pass_index, shard["first_sequence"]
                                                             // self.shard_sequences))
        masked, labels = self.masker(ids, attn, generator)
        starts = torch.cumsum(lengths, 0) - lengths
        tokens = int(lengths.sum())
        k, dtypes = self.index["top_k"], self.index["dtypes"]
        out = {"input_ids": masked[attn.bool()], "labels": labels[attn.bool()],
               "topk_logits": torch.empty(tokens, k), "topk_index": torch.empty(tokens, k, dtype=torch.int64),
               "lse": torch.empty(tokens)}
        if "hidden" in dtypes:
            out["hidden"] = torch.empty(tokens, self.index["teacher"]["hidden_size"])
        # Longest first, so each batch pads little; the order is fixed, so the bytes are too.
        order = torch.sort(lengths, descending=True, stable=True).indices
        for batch in order.split(self.batch_size):
            b_width = int(lengths[batch].max())
            b_ids = masked[batch, :b_width].to(self.device)
            b_attn = attn[batch, :b_width].to(self.device)
            values, index, lse, hidden = self._teacher_outputs(b_ids, b_attn)
            positions = torch.cat([torch.arange(int(starts[i]), int(starts[i] + lengths[i])) for i in batch])
            out["topk_logits"][positions] = values.cpu()
            out["topk_index"][positions] = index.cpu()
            out["lse"][positions] = lse.cpu()
            if hidden is not None:
                out["hidden"][positions] = hidden.float().cpu()
            bar.update(int(lengths[batch].sum()))
        final = self.output / shard["name"]
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, value in out.items():
            _write_npy(tmp / f"{name}.npy", _to_numpy(value, dtypes[name]))
        os.replace(tmp, final)

    def run(self):
        """Build the missing shards; returns the cache directory."""
        if self._prepare_output():
            return self.output
        lengths = torch.from_numpy(self.lengths)
        todo = [s for s in self.index["shards"] if not (self.output / s["name"]).is_dir()]
        total = self.index["num_tokens"] * self.index["passes"]
        done = total - sum(int(lengths[s["first_sequence"]:s["first_sequence"] + s["num_sequences"]].sum())
                           for s in todo)
        with tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not self.progress,
                  desc="distil-cache-teacher") as bar:
            for shard in todo:
                self._build_shard(shard, bar)
        _write_json(self.output / INDEX, dict(self.index, complete=True))
        return self.output


def build_cache(teacher, data, output, **options):
    """Build (or finish) the cache of ``teacher`` on the text files ``data`` under ``output``; see the
    module docstring and :class:`CacheBuilder` for the options. Returns the cache directory."""
    return CacheBuilder(teacher, data, output, **options).run()


class TeacherCache:
    """A finished cache, memory-mapped. ``batch(pass_index, sequences, width)`` returns padded tensors."""

    def __init__(self, path):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise ValueError(f"teacher cache: no {INDEX} in {str(self.path)!r}")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"teacher cache: {str(self.path)!r} is not a {FORMAT} version {VERSION}")
        if not self.index["complete"]:
            raise ValueError(f"teacher cache: {str(self.path)!r} is incomplete; rerun distil-cache-teacher "
                             "with the same arguments to finish it")
        self.lengths = torch.from_numpy(np.load(self.path / LENGTHS))
        self.starts = torch.cumsum(self.lengths.long(), 0) - self.lengths.long()
        self.top_k, self.temperature, self.passes = self.index["top_k"], self.index["temperature"], self.index["passes"]
        self.has_hidden = "hidden" in self.index["dtypes"]
        self._shards = {}

    def __len__(self):
        return len(self.lengths)

    def check_corpus(self, files, tokenizer_size):
        """Raise ValueError unless ``files`` are the corpus the cache was built from (paths and sizes;
        the sha256 in the index is for a full audit) and the tokenizer has the cache's size."""
        mine = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in files]
        theirs = [{"path": f["path"], "bytes": f["bytes"]} for f in self.index["corpus"]]
        if mine != theirs:
            raise ValueError(f"data: the files {[m['path'] for m in mine]} are not the corpus the teacher cache "
                             f"{str(self.path)!r} was built from ({[t['path'] for t in theirs]}, sizes included)")
        if tokenizer_size != self.index["tokenizer"]["size"]:
            raise ValueError(f"teacher: the tokenizer has {tokenizer_size} tokens but the teacher cache was built "
                             f"with {self.index['tokenizer']['size']}")

    def _arrays(self, pass_index, shard):
        key = (pass_index, shard)
        if key not in self._shards:
            folder = self.path / _shard_name(pass_index, shard)
            self._shards[key] = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                                 for name in self.index["dtypes"]}
        return self._shards[key]

    def sequences(self, pass_index=0):
        """The original token ids of every sequence (lists of ints): the masked ids of ``pass_index``
        with the labels put back."""
        out = []
        per_shard = self.index["shard_sequences"]
        for shard_entry in self.index["shards"]:
            if shard_entry["pass"] != pass_index:
                continue
            shard = shard_entry["first_sequence"] // per_shard
            arrays = self._arrays(pass_index, shard)
            ids = torch.from_numpy(np.asarray(arrays["input_ids"], dtype=np.int64))
            labels = torch.from_numpy(np.asarray(arrays["labels"], dtype=np.int64))
            original = torch.where(labels != -100, labels, ids)
            first = shard_entry["first_sequence"]
            sizes = self.lengths[first:first + shard_entry["num_sequences"]].tolist()
            out.extend(part.tolist() for part in original.split(sizes))
        return out

    def batch(self, pass_index, sequence_index, width, pad_id):
        """Padded ``[b, width]`` tensors of sequences ``sequence_index`` in pass ``pass_index % passes``:
        ``input_ids`` (masked, ``pad_id`` at padding), ``attention_mask``, ``labels`` (-100 at padding),
        ``topk_logits`` / ``topk_index`` ``[b, width, k]``, ``lse`` ``[b, width]``, and ``hidden``
        ``[b, width, H]`` when cached. Padding rows of the teacher tensors are zeros / index 0."""
        pass_index %= self.passes
        per_shard = self.index["shard_sequences"]
        dtypes = self.index["dtypes"]
        b = len(sequence_index)
        attn = torch.zeros(b, width, dtype=torch.int64)
        parts = {}
        for row, i in enumerate(sequence_index.tolist()):
            shard = i // per_shard
            arrays = self._arrays(pass_index, shard)
            local = int(self.starts[i] - self.starts[shard * per_shard])
            n = int(self.lengths[i])
            attn[row, :n] = 1
            for name, array in arrays.items():
                parts.setdefault(name, []).append(_from_numpy(array[local:local + n], dtypes[name]))
        mask = attn.bool()
        out = {"attention_mask": attn}
        for name, chunks in parts.items():
            flat = torch.cat(chunks)
            fill = {"input_ids": pad_id, "labels": -100}.get(name, 0)
            padded = torch.full((b, width, *flat.shape[1:]), fill, dtype=flat.dtype)
            padded[mask] = flat
            out[name] = padded
        out["input_ids"] = out["input_ids"].long()
        out["labels"] = out["labels"].long()
        return out


def build_parser():
    parser = argparse.ArgumentParser(prog="distil-cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher model directory (from_pretrained, safetensors)")
    parser.add_argument("--data", nargs="+", required=True, help="text files or folders of *.txt")
    parser.add_argument("--output", required=True, help="cache directory (created; an unfinished one resumes)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token")
    parser.add_argument("--passes", type=int, default=3, help="maskings of the corpus; epoch e replays pass e mod passes")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="T of the stored logsumexp; train with the same --temperature")
    parser.add_argument("--hidden", action="store_true", help="also store the last hidden states (for alpha_cos > 0)")
    parser.add_argument("--dtype", default="float16", choices=sorted(LOGIT_DTYPES), help="dtype of the stored logits")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence, as distil-train's")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per teacher forward")
    parser.add_argument("--shard-sequences", type=int, default=1024, help="sequences per shard (the resume unit)")
    parser.add_argument("--seed", type=int, default=56, help="masking seed")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    """Console entry point ``distil-cache-teacher`` (also ``python -m distil.teacher_cache``)."""
    args = vars(build_parser().parse_args(argv))
    try:
        path = build_cache(args.pop("teacher"), args.pop("data"), args.pop("output"), **args)
    except ValueError as err:
        print(f"distil-cache-teacher: {err}", file=sys.stderr)
        return 2
    print(f"distil-cache-teacher: cache complete in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
