"""Offline teacher: run the teacher once over the corpus, store its top-k logits, train students from them.

``distil-cache-teacher --teacher DIR --data PATH... --output CACHE [--top-k 64] [--passes 3]
[--temperature 2.0] [--hidden] [--block-size N]`` (also ``python -m distil.teacher_cache``) builds a cache;
``distil-train --teacher-cache CACHE`` trains from it without loading the teacher, with
:func:`distil.fused_loss.topk_kl_ce_loss` in exact mode (the cached lse at the cache temperature).

Masking: the teacher must see exactly the student's masked input, so the cache fixes the masking.
Pass ``p`` masks every sequence once with the trainer's masker (:class:`distil.masking.MLMMasker`
with the corpus' token counts, the paper's 15% / 80-10-10 / smoothing 0.7), shard by shard with a
generator seeded from (seed, p, shard), and stores the masked ids and labels beside the teacher's
outputs; training epoch ``e`` replays pass ``e mod passes``.

Causal teachers (config.json names an ``AutoModelForCausalLM`` class): nothing is masked, so there is
one pass of the token ids as the trainer feeds them (one document per row, or with ``--block-size N``
the documents packed into N-token blocks, :func:`distil.data.pack_blocks`) and the teacher's outputs at
every position (its next-token distribution); the trainer derives the next-token labels
(:func:`distil.step.causal_labels`). The index records ``causal`` and ``block_size`` and the trainer
refuses a cache of the other kind or block size.

At scale: under ``torchrun`` (``WORLD_SIZE`` > 1, any number of nodes sharing the output directory)
rank ``r`` of ``W`` builds the shards whose position in the shard table is ``r mod W``; rank 0 writes
the index first and, after every rank has written and hashed its shards, the final one. Every shard
depends only on its own sequences, so the cache is byte-identical to a one-process build, and an
interrupted build resumes with any number of ranks.

Per token the cache holds: the masked id and label (int16 when the tokenizer has <= 32767 ids, else
int32; label -100 where not masked; a causal cache: the id alone), the teacher's k largest logits at
T = 1 (``--dtype``: float16 by default, bfloat16, or float32) and their vocabulary indices (int16
when V <= 32767, else int32), the full-vocabulary ``logsumexp(logits / T)`` at the cache temperature
(float32), and with ``--hidden`` the last hidden state (float16). At k = 64, float16, int16 that is
2 + 2 + 64 * (2 + 2) + 4 = 264 bytes per token per pass (262 for a causal cache, which has no labels).

Layout of CACHE/ (format ``distil-teacher-cache`` version 2)::

    index.json                     metadata (teacher: config and weights sha256; tokenizer: sha256 of
                                   its vocabulary and special tokens; k, T, passes, dtypes, causal,
                                   masking, block_size, corpus files with sizes and sha256) and the
                                   shard table; "complete"
                                   is true once every shard is written; "checksum" is the sha256 of
                                   all the rest, so an edit (of T, passes, k...) is detected
    lengths.npy                    int32 [sequences]: tokens per sequence (pass-independent)
    pass{p}/shard{s:05d}/{input_ids[,labels],topk_logits,topk_index,lse[,hidden]}.npy
                                   the tokens of sequences [s * shard_sequences, ...) of pass p,
                                   concatenated without padding; [tokens] or [tokens, k] / [tokens, H]

Why ``.npy`` shards and not safetensors: numpy is already a dependency, ``np.load(mmap_mode="r")``
maps a shard without reading it (a batch touches only its own rows' pages), the header is a short
fixed-format text so the bytes depend only on the data (resumed builds are byte-identical), and
one file per field keeps each array contiguous and typed. numpy has no bfloat16: bfloat16 logits
are stored as their int16 bit patterns and ``index.json`` names the dtype.

A shard is written into ``<shard>.tmp/`` (each file flushed and fsynced) and renamed into place, so
a shard directory is either complete or absent. An interrupted build (Ctrl-C, a kill, a crash)
resumes with the same command: finished shards are re-checked and kept, a partial or damaged one is
redone, and the result is byte-identical to an uninterrupted build (every shard depends only on its
own sequences, seed and pass; the teacher runs deterministically on the same machine).

Opening a cache (:class:`TeacherCache`, hence ``distil-train --teacher-cache`` before its first step)
checks the checksum of ``index.json`` and every shard of every pass against it: each file present,
its ``.npy`` header readable, its dtype, shape (tokens of the shard, k, H) and byte size as recorded;
the first bad file is named in a one-line ``ValueError``. ``distil-cache-teacher --verify CACHE``
also re-hashes every file against the sha256 recorded when the build finished. docs/teacher_cache.md
has the whole list.
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
import torch.distributed as dist
from tqdm.auto import tqdm

from distil.checks import check_int, check_temperature
from distil.data import load_corpus, pack_blocks, text_files
from distil.masking import MLMMasker, token_counts
from distil.ops import masked_gather
from distil.student import causal_lm_directory, lm_adapter

FORMAT = "distil-teacher-cache"
VERSION = 2
INDEX = "index.json"
LENGTHS = "lengths.npy"
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT16_MAX = 32767
# The trainer's (and the paper's) masking: 15% of the tokens, 80/10/10, count^-0.7 smoothing.
MASKING = {"mask_prop": 0.15, "word_mask": 0.8, "word_keep": 0.1, "word_rand": 0.1, "smoothing": 0.7}


def _int_dtype(size):
    """int16 when every id / index (and -100) fits, else int32."""
    return "int16" if size <= INT16_MAX + 1 else "int32"


def field_dtypes(tokenizer_size, vocab_size, logits_dtype="float16", hidden=False, causal=False):
    """{field: stored dtype name} of a cache (see the module docstring); a causal cache has no labels."""
    return {"input_ids": _int_dtype(tokenizer_size), **({} if causal else {"labels": _int_dtype(tokenizer_size)}),
            "topk_logits": logits_dtype, "topk_index": _int_dtype(vocab_size), "lse": "float32",
            **({"hidden": "float16"} if hidden else {})}


def bytes_per_token(top_k, tokenizer_size, vocab_size, logits_dtype="float16", hidden_size=None, causal=False):
    """Cache bytes per token and pass (the .npy headers aside): 264 at k = 64, float16, V <= 32767
    (262 for a causal cache)."""
    dtypes = field_dtypes(tokenizer_size, vocab_size, logits_dtype, hidden_size is not None, causal)
    width = {"topk_logits": top_k, "topk_index": top_k, "hidden": hidden_size or 0}
    return sum(width.get(name, 1) * getattr(torch, dtype).itemsize for name, dtype in dtypes.items())


def _sha256(*paths):
    """sha256 of the files' bytes, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_sha256(tokenizer):
    """The tokenizer by content: sha256 of its vocabulary (token -> id) and its special tokens with
    their ids. Two tokenizers of the same size but another vocabulary (or another mask/pad token) differ."""
    content = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
               "special": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)),
               "mask": tokenizer.mask_token_id, "pad": tokenizer.pad_token_id}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def teacher_sha256(directory):
    """(config sha256, weights sha256) of a model directory: config.json, and the safetensors files
    (the sharded index and its shards in name order, or model.safetensors)."""
    directory = Path(directory)
    weights = sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("model.safetensors.index.json"))
    if not weights:
        raise ValueError(f"teacher: no model*.safetensors in {directory}")
    return _sha256(directory / "config.json"), _sha256(*weights)


def _checksum(index):
    """sha256 of the index without its own checksum (canonical JSON)."""
    body = {k: v for k, v in index.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    obj = dict(obj, checksum=_checksum(obj))
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


def _stored_dtype(dtype_name):
    """The numpy dtype a field is stored as (bfloat16 as its int16 bits)."""
    return np.dtype("int16" if dtype_name == "bfloat16" else dtype_name)


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

    def __init__(self, teacher, data, output, *, top_k=64, passes=None, temperature=2.0, hidden=False,
                 dtype="float16", max_length=512, block_size=None, batch_size=32, shard_sequences=1024, seed=56,
                 device=None, progress=True):
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        if not Path(teacher).is_dir():
            raise ValueError(f"teacher must be a local model directory, got {str(teacher)!r}")
        self.causal = causal_lm_directory("teacher", teacher)
        if passes is None:
            passes = 1 if self.causal else 3
        for name, value, low, high in (("top_k", top_k, 1, None), ("passes", passes, 1, (1 << 16) - 1),
                                       ("batch_size", batch_size, 1, None),
                                       ("shard_sequences", shard_sequences, 1, None), ("seed", seed, 0, (1 << 23) - 1),
                                       ("max_length", max_length, 3, None)):
            check_int(name, value, low, high)
        if block_size is not None:
            check_int("block_size", block_size, 2)
        if self.causal and passes != 1:
            raise ValueError(f"passes is {passes} but the teacher {teacher} is a causal LM: nothing is masked, so its "
                             "cache has one pass (every epoch replays it)")
        if not self.causal and block_size is not None:
            raise ValueError(f"block_size is for causal-LM teachers; {teacher} is a masked LM (one document per row)")
        self.temperature = check_temperature("temperature", temperature)
        if dtype not in LOGIT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(LOGIT_DTYPES)}, got {dtype!r}")
        self.output = Path(output)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if device is None:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size, self.shard_sequences, self.seed = batch_size, shard_sequences, seed
        self.progress = progress and self.rank == 0
        self.tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)
        auto_class = AutoModelForCausalLM if self.causal else AutoModelForMaskedLM
        model = auto_class.from_pretrained(teacher, use_safetensors=True, trust_remote_code=False)
        self.teacher = model.requires_grad_(False).eval().to(self.device)
        self.adapter = lm_adapter(self.teacher)
        vocab_out = self.teacher.config.vocab_size
        if top_k > vocab_out:
            raise ValueError(f"top_k must be <= the teacher's vocabulary size {vocab_out}, got {top_k}")
        files = text_files(data)
        self.sequences = load_corpus(files, self.tokenizer, max_length=max_length)
        if block_size is not None:  # the trainer's --block-size blocks: the teacher sees what the student will
            self.sequences = pack_blocks(self.sequences, block_size)
        if not self.sequences:
            raise ValueError("data: no sequence survived tokenisation and filtering"
                             + (f" (or fewer tokens than one block of {block_size})" if block_size else ""))
        vocab = len(self.tokenizer)
        self.masker = None if self.causal else MLMMasker(
            vocab, special_ids=self.tokenizer.all_special_ids, mask_id=self.tokenizer.mask_token_id,
            counts=token_counts(self.sequences, vocab), **MASKING)
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int32)
        num_shards = -(-len(self.sequences) // shard_sequences)
        config_sha256, weights_sha256 = teacher_sha256(teacher)
        self.index = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": {"path": str(Path(teacher).resolve()), "class": type(self.teacher).__name__,
                        "vocab_size": vocab_out, "hidden_size": self.teacher.config.hidden_size,
                        "config_sha256": config_sha256, "weights_sha256": weights_sha256},
            "tokenizer": {"path": str(Path(teacher).resolve()), "class": type(self.tokenizer).__name__,
                          "size": vocab, "sha256": tokenizer_sha256(self.tokenizer)},
            "top_k": top_k,
            "temperature": self.temperature,
            "passes": passes,
            "dtypes": field_dtypes(vocab, vocab_out, dtype, hidden, self.causal),
            "causal": self.causal,
            "masking": None if self.causal else {"seed": seed, **MASKING},
            "max_length": max_length,
            "block_size": block_size,
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
            existing = read_index(self.output, complete=False)
            mine = dict(self.index, complete=existing.get("complete"), checksum=existing["checksum"],
                        **({"files": existing["files"]} if "files" in existing else {}))
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
        out = {}
        if self.causal:
            masked = ids
        else:
            generator = torch.Generator().manual_seed(_mask_seed(self.seed, pass_index, shard["first_sequence"]
                                                                 // self.shard_sequences))
            masked, labels = self.masker(ids, attn, generator)
            out["labels"] = labels[attn.bool()]
        starts = torch.cumsum(lengths, 0) - lengths
        tokens = int(lengths.sum())
        k, dtypes = self.index["top_k"], self.index["dtypes"]
        out.update(input_ids=masked[attn.bool()], topk_logits=torch.empty(tokens, k),
                   topk_index=torch.empty(tokens, k, dtype=torch.int64), lse=torch.empty(tokens))
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
        for name, dtype_name in dtypes.items():
            _write_npy(tmp / f"{name}.npy", _to_numpy(out[name], dtype_name))
        os.replace(tmp, final)

    def _shard_ok(self, shard):
        """Whether a shard left by an earlier run is whole (else it is removed, to be redone)."""
        folder = self.output / shard["name"]
        if not folder.is_dir():
            return False
        try:
            check_shard(self.output, self.index, shard, self.lengths)
            return True
        except ValueError:
            shutil.rmtree(folder)
            return False

    def run(self):
        """Build the missing (or damaged) shards; returns the cache directory. Under ``torchrun`` each
        rank builds its share (see the module docstring) and joins a gloo group for the handshakes
        (created here, and destroyed here, unless the caller had one)."""
        joined = self.world_size > 1 and not dist.is_initialized()
        if joined:
            dist.init_process_group("gloo")
        try:
            self._run()
            if joined:
                dist.barrier()  # every rank leaves together (a group destroyed under a working peer can hang it)
        finally:
            if joined:
                dist.destroy_process_group()
        return self.output

    def _run(self):
        # Rank 0 creates the directory (or checks the one there) and tells the others what it found.
        status = [None]
        if self.rank == 0:
            try:
                status = ["complete" if self._prepare_output() else "todo"]
            except ValueError as err:
                status = [err]
        if self.world_size > 1:
            dist.broadcast_object_list(status, src=0)
        if isinstance(status[0], ValueError):
            raise status[0]
        if status[0] == "complete":
            return
        mine = self.index["shards"][self.rank::self.world_size]  # shard i of the table: rank i mod W
        lengths = torch.from_numpy(self.lengths)
        todo = [s for s in mine if not self._shard_ok(s)]

        def tokens(shards):
            return sum(int(lengths[s["first_sequence"]:s["first_sequence"] + s["num_sequences"]].sum()) for s in shards)

        total = tokens(mine)
        desc = "distil-cache-teacher" + (f" (rank 0 of {self.world_size})" if self.world_size > 1 else "")
        with tqdm(total=total, initial=total - tokens(todo), unit="tok", unit_scale=True, disable=not self.progress,
                  desc=desc) as bar:
            for shard in todo:
                self._build_shard(shard, bar)
        files = {str(p.relative_to(self.output)): _sha256(p)
                 for s in mine for p in sorted((self.output / s["name"]).glob("*.npy"))}
        if self.world_size > 1:
            every = [None] * self.world_size
            dist.all_gather_object(every, files)
            files = {name: digest for part in every for name, digest in part.items()}
        if self.rank == 0:
            _write_json(self.output / INDEX, dict(self.index, complete=True, files=files))


def build_cache(teacher, data, output, **options):
    """Build (or finish) the cache of ``teacher`` on the text files ``data`` under ``output``; see the
    module docstring and :class:`CacheBuilder` for the options. Returns the cache directory."""
    return CacheBuilder(teacher, data, output, **options).run()


def read_index(path, complete=True):
    """The ``index.json`` of the cache at ``path``, checked: valid JSON, this format and version, an
    unedited checksum, a shard table that covers every pass, and (with ``complete``) finished. Raises a
    one-line ValueError naming the file."""
    index_path = Path(path) / INDEX
    if not index_path.is_file():
        raise ValueError(f"teacher cache: no {INDEX} in {str(path)!r} (build it with distil-cache-teacher)")
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"teacher cache: {index_path} is not valid JSON ({err}); rebuild the cache") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"teacher cache: {index_path} is not a {FORMAT} version {VERSION} index; rebuild the cache")
    if index.get("checksum") != _checksum(index):
        raise ValueError(f"teacher cache: {index_path} was edited after it was written (its checksum does not "
                         "match: T, k, passes and the shard table are what the data was built with); rebuild "
                         "the cache rather than edit it")
    passes = {s["pass"] for s in index["shards"]}
    if passes != set(range(index["passes"])):
        raise ValueError(f"teacher cache: {index_path} has passes = {index['passes']} but shards for passes "
                         f"{sorted(passes)}")
    if complete and not index["complete"]:
        raise ValueError(f"teacher cache: {str(path)!r} is incomplete; rerun distil-cache-teacher with the same "
                         "arguments to finish it")
    return index


def _npy_header(path):
    """(shape, dtype, data offset) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


def check_shard(path, index, shard, lengths):
    """Raise a one-line ValueError naming the first file of ``shard`` that is missing, unreadable, or of
    another dtype, shape or size than ``index`` records (``lengths``: tokens per sequence)."""
    first, count = shard["first_sequence"], shard["num_sequences"]
    tokens = int(np.asarray(lengths[first:first + count], dtype=np.int64).sum())
    width = {"topk_logits": index["top_k"], "topk_index": index["top_k"], "hidden": index["teacher"]["hidden_size"]}
    for name, dtype_name in index["dtypes"].items():
        file = Path(path) / shard["name"] / f"{name}.npy"
        want_shape = (tokens, width[name]) if name in width else (tokens,)
        want_dtype = _stored_dtype(dtype_name)
        if not file.is_file():
            raise ValueError(f"teacher cache: {file} is missing; rerun distil-cache-teacher with the same arguments "
                             "to rebuild that shard")
        try:
            shape, dtype, offset = _npy_header(file)
        except (ValueError, OSError, EOFError, SyntaxError) as err:
            raise ValueError(f"teacher cache: {file} has an unreadable .npy header ({err})") from None
        if dtype != want_dtype or tuple(shape) != want_shape:
            raise ValueError(f"teacher cache: {file} holds {dtype} {tuple(shape)} but the index records "
                             f"{dtype_name} {want_shape}")
        size, want_size = file.stat().st_size, offset + want_dtype.itemsize * int(np.prod(want_shape))
        if size != want_size:
            raise ValueError(f"teacher cache: {file} has {size} bytes, {want_size} expected (truncated or "
                             "appended to)")


class TeacherCache:
    """A finished cache, memory-mapped. ``batch(pass_index, sequences, width)`` returns padded tensors.
    Opening it checks ``index.json`` and every shard of every pass (:func:`read_index`,
    :func:`check_shard`): a damaged cache fails here, before training starts, not at its first read."""

    def __init__(self, path):
        self.path = Path(path)
        self.index = read_index(self.path)
        try:
            lengths = np.load(self.path / LENGTHS)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"teacher cache: {self.path / LENGTHS} is unreadable ({err})") from None
        if lengths.shape != (self.index["num_sequences"],) or int(lengths.sum()) != self.index["num_tokens"]:
            raise ValueError(f"teacher cache: {self.path / LENGTHS} does not hold the index's "
                             f"{self.index['num_sequences']} sequences of {self.index['num_tokens']} tokens")
        for shard in self.index["shards"]:
            check_shard(self.path, self.index, shard, lengths)
        self.lengths = torch.from_numpy(lengths)
        self.starts = torch.cumsum(self.lengths.long(), 0) - self.lengths.long()
        self.top_k, self.temperature, self.passes = self.index["top_k"], self.index["temperature"], self.index["passes"]
        self.has_hidden = "hidden" in self.index["dtypes"]
        self._shards = {}

    def __len__(self):
        return len(self.lengths)

    def check_sources(self, files, tokenizer, teacher):
        """Raise ValueError unless ``files`` are the corpus the cache was built from (paths and sizes;
        the sha256 in the index is for a full audit), ``tokenizer`` has its vocabulary and special
        tokens (by content, not size) and the model directory ``teacher`` its config and weights."""
        mine = [{"path": str(Path(f).resolve()), "bytes": Path(f).stat().st_size} for f in files]
        theirs = [{"path": f["path"], "bytes": f["bytes"]} for f in self.index["corpus"]]
        if mine != theirs:
            raise ValueError(f"data: the files {[m['path'] for m in mine]} are not the corpus the teacher cache "
                             f"{str(self.path)!r} was built from ({[t['path'] for t in theirs]}, sizes included)")
        recorded = self.index["tokenizer"]
        if tokenizer_sha256(tokenizer) != recorded["sha256"]:
            raise ValueError(f"teacher: the tokenizer in {teacher} ({len(tokenizer)} tokens) is not the one the "
                             f"teacher cache {str(self.path)!r} was built with ({recorded['path']}, {recorded['size']} "
                             "tokens): another vocabulary or other special tokens")
        if teacher_sha256(teacher) != (self.index["teacher"]["config_sha256"], self.index["teacher"]["weights_sha256"]):
            raise ValueError(f"teacher: {teacher} is not the teacher the cache {str(self.path)!r} was built from "
                             f"({self.index['teacher']['path']}): its config or weights differ")

    def verify(self):
        """Re-hash every shard file against the sha256 recorded when the build finished; raises a
        one-line ValueError naming the first that differs."""
        for name, digest in self.index["files"].items():
            if _sha256(self.path / name) != digest:
                raise ValueError(f"teacher cache: {self.path / name} does not match its recorded sha256")

    def _arrays(self, pass_index, shard):
        key = (pass_index, shard)
        if key not in self._shards:
            folder = self.path / _shard_name(pass_index, shard)
            self._shards[key] = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
                                 for name in self.index["dtypes"]}
        return self._shards[key]

    def sequences(self, pass_index=0):
        """The original token ids of every sequence (lists of ints): the masked ids of ``pass_index``
        with the labels put back (a causal cache: its ids, packed into blocks if it was built so)."""
        out = []
        per_shard = self.index["shard_sequences"]
        for shard_entry in self.index["shards"]:
            if shard_entry["pass"] != pass_index:
                continue
            shard = shard_entry["first_sequence"] // per_shard
            arrays = self._arrays(pass_index, shard)
            original = torch.from_numpy(np.asarray(arrays["input_ids"], dtype=np.int64))
            if "labels" in arrays:
                labels = torch.from_numpy(np.asarray(arrays["labels"], dtype=np.int64))
                original = torch.where(labels != -100, labels, original)
            first = shard_entry["first_sequence"]
            sizes = self.lengths[first:first + shard_entry["num_sequences"]].tolist()
            out.extend(part.tolist() for part in original.split(sizes))
        return out

    def batch(self, pass_index, sequence_index, width, pad_id):
        """Padded ``[b, width]`` tensors of sequences ``sequence_index`` in pass ``pass_index % passes``:
        ``input_ids`` (masked, ``pad_id`` at padding), ``attention_mask``, ``labels`` (-100 at padding;
        none in a causal cache: :func:`distil.step.causal_labels` derives them),
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
        if "labels" in out:
            out["labels"] = out["labels"].long()
        return out


def build_parser():
    parser = argparse.ArgumentParser(prog="distil-cache-teacher", description=__doc__.split("\n\n")[0],
                                     epilog="exit codes: 0 done (or verified), 1 a bad value, file or cache "
                                            "(one line on stderr), 2 bad command line")
    parser.add_argument("--verify", metavar="CACHE", help="check CACHE (index, every shard's header and size, "
                        "and every file's sha256) and exit; no other flag is needed")
    parser.add_argument("--teacher", help="teacher model directory (from_pretrained, safetensors) (required)")
    parser.add_argument("--data", nargs="+", help="text files or folders of *.txt (required)")
    parser.add_argument("--output", help="cache directory (created; an unfinished one resumes) (required)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token")
    parser.add_argument("--passes", type=int, default=None,
                        help="maskings of the corpus; epoch e replays pass e mod passes (default: 3; causal "
                             "teachers: 1, the only value, as nothing is masked)")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="T of the stored logsumexp; train with the same --temperature")
    parser.add_argument("--hidden", action="store_true", help="also store the last hidden states (for alpha_cos > 0)")
    parser.add_argument("--dtype", default="float16", choices=sorted(LOGIT_DTYPES), help="dtype of the stored logits")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence, as distil-train's")
    parser.add_argument("--block-size", type=int, default=None,
                        help="causal teachers: pack the documents into blocks of this many tokens, as distil-train's "
                             "--block-size (default: one document per row)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per teacher forward")
    parser.add_argument("--shard-sequences", type=int, default=1024, help="sequences per shard (the resume unit)")
    parser.add_argument("--seed", type=int, default=56, help="masking seed")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    """Console entry point ``distil-cache-teacher`` (also ``python -m distil.teacher_cache``)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    verify = args.pop("verify")
    if verify is None:
        missing = [f"--{name}" for name in ("teacher", "data", "output") if args[name] is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        if verify is not None:
            TeacherCache(verify).verify()
            print(f"distil-cache-teacher: {verify} verified", file=sys.stderr)
            return 0
        path = build_cache(args.pop("teacher"), args.pop("data"), args.pop("output"), **args)
    except ValueError as err:
        print(f"distil-cache-teacher: error: {err}", file=sys.stderr)
        return 1
    print(f"distil-cache-teacher: cache complete in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
