"""Corpus loading and length-grouped, resumable batching for distillation.

- :func:`text_files`: the text files named by files and folders (what ``distil-train --data`` takes).
- :func:`load_corpus`: text files -> token-id sequences, as the paper's ``scripts/binarized_data.py``
  plus the cleaning in its ``LmSeqsDataset`` (split over-long sequences, drop short and
  mostly-unknown ones), with the fast tokenizer's batch encoding.
- :func:`pack_blocks`: sequences concatenated and cut into fixed-length blocks (causal LMs'
  ``--block-size``, the ``group_texts`` of Hugging Face's causal-LM examples).
- :class:`LengthGroupedBatches`: padded batches of similar lengths in a seeded order, with a
  ``state_dict`` so a reader resumes at the exact batch (the paper's ``group_by_size`` batching is
  ``GroupedBatchSampler`` over length bins; this groups within random mega-chunks instead, as
  ``transformers.trainer_pt_utils.LengthGroupedSampler`` does, which keeps epochs well mixed).
"""
import math
import os
from pathlib import Path

import torch

from distil.checks import check_int

MIN_KEPT_LENGTH = 12  # the paper drops sequences of <= 11 tokens
MAX_UNK_FRACTION = 0.5  # ... and those with >= 50% unknown tokens
_ENCODE_CHUNK = 2048  # lines per batch-encoding call: bounded memory, full tokenizer parallelism
GROUP_BATCHES = 50  # batches per mega-chunk sorted by length


def _frame_ids(tokenizer):
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if first is None or last is None:
        raise ValueError("tokenizer must define cls/sep (or bos/eos) tokens to frame each sequence")
    return first, last


def _pieces(content, first, last, unk_id, width):
    # split the content into pieces of at most `width` tokens, frame each, keep the clean ones
    for start in range(0, len(content), width):
        seq = [first, *content[start : start + width], last]
        if len(seq) < MIN_KEPT_LENGTH:
            continue
        if unk_id is not None and seq.count(unk_id) >= MAX_UNK_FRACTION * len(seq):
            continue
        yield seq


def text_files(paths):
    """The text files named by ``paths``: files as given, folders expanded to their ``*.txt`` (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"data path {str(p)!r} is neither a file nor a folder")
    if not files:
        raise ValueError(f"data: no .txt files under {list(map(str, paths))}")
    return files


def load_corpus(paths, tokenizer, max_length=512):
    """Token-id sequences (lists of ints) from text files, one document per non-blank line.

    Each line is encoded with the fast ``tokenizer`` (batch encoding, no special tokens), split
    into pieces of at most ``max_length - 2`` tokens, and each piece is framed with the
    tokenizer's CLS ... SEP (BOS ... EOS when it has no CLS/SEP).  Pieces of <= 11 tokens or with
    >= 50% UNK (framing included, as in the paper) are dropped.  Order: files as given, lines in
    file order.  Equivalent of ``scripts/binarized_data.py`` then ``LmSeqsDataset``'s
    ``divide_into_chunks``, ``remove_empty_sequences`` and ``remove_unknown_sequences``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not hasattr(paths, "__iter__"):
        raise TypeError(f"paths must be a path or an iterable of paths, got {type(paths).__name__}")
    paths = list(paths)
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"paths must hold str or os.PathLike, got {type(p).__name__}")
        if not Path(p).is_file():
            raise ValueError(f"paths: {str(p)!r} is not a file")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"tokenizer must be a fast Hugging Face tokenizer, got {type(tokenizer).__name__}")
    check_int("max_length", max_length, 3)
    first, last = _frame_ids(tokenizer)
    unk_id = tokenizer.unk_token_id

    sequences = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except UnicodeDecodeError as err:
            raise ValueError(f"data file {str(p)!r} is not UTF-8 text (byte {err.start}: {err.reason}); "
                             "convert it (e.g. iconv -t UTF-8) or leave it out") from None
        lines = [line for line in lines if line]
        for start in range(0, len(lines), _ENCODE_CHUNK):
            encoded = tokenizer(
                lines[start : start + _ENCODE_CHUNK],
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,  # over-long lines are expected: we split them
            )["input_ids"]
            for content in encoded:
                sequences.extend(_pieces(content, first, last, unk_id, max_length - 2))
    return sequences


def pack_blocks(sequences, block_size):
    """``sequences`` (token-id lists, each framed as :func:`load_corpus` frames it) concatenated in order
    and cut into blocks of exactly ``block_size`` tokens; the remainder shorter than a block is dropped.
    Equivalent of ``group_texts`` in Hugging Face's ``run_clm.py`` (over the whole corpus rather than
    per map batch): every block is all real tokens, so its attention mask is all ones and its positions
    are ``0..block_size-1``, attention crossing document boundaries as there."""
    check_int("block_size", block_size, 2)
    flat = [token for seq in sequences for token in seq]
    usable = len(flat) - len(flat) % block_size
    return [flat[start : start + block_size] for start in range(0, usable, block_size)]


class LengthGroupedBatches:
    """Padded batches of sequences of similar length, in an order fixed by ``seed`` and the epoch.

    Each epoch: a random permutation of the sequences (``torch.randperm`` with a generator seeded
    ``seed + 1_000_003 * epoch``) is cut into mega-chunks of ``GROUP_BATCHES * batch_size``, each
    chunk is sorted by length (longest first) and cut into batches, and the batches are shuffled.
    Every sequence appears exactly once per epoch; one batch (the tail of the last chunk) may
    be smaller.

    Iterating yields ``dict(input_ids=int64 [b, L], attention_mask=int64 [b, L], sequence_index=int64 [b],
    epoch=int)`` (right padding with ``pad_id``, ``L`` the longest in the batch; the indices of the
    batch's sequences and the epoch, which a teacher cache looks up) from the current position to the
    end of the current epoch, then moves to the next epoch.  ``state_dict()`` after consuming a batch names
    the next one; ``load_state_dict`` on a reader built from the same sequences, batch size and
    seed continues exactly there.  Equivalent of the paper's ``group_by_size`` batching
    (``GroupedBatchSampler``) in a ``DataLoader``, plus a resumable position.
    """

    def __init__(self, sequences, batch_size, seed, pad_id):
        if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
            raise TypeError(f"sequences must be a list of token-id lists, got {type(sequences).__name__}")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.pad_id = check_int("pad_id", pad_id, 0)
        for i, seq in enumerate(sequences):
            if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__") or len(seq) == 0:
                raise ValueError(f"sequences[{i}] must be a non-empty sequence of token ids")
        self.sequences = sequences
        self.lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        self.epoch = 0
        self.position = 0  # index of the next batch in this epoch

    def __len__(self):
        """Batches per epoch."""
        return math.ceil(len(self.sequences) / self.batch_size)

    def _epoch_batches(self, epoch):
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        order = torch.randperm(len(self.sequences), generator=g)
        chunk = GROUP_BATCHES * self.batch_size
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[torch.sort(self.lengths[part], descending=True, stable=True).indices]
            batches.extend(part.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def _collate(self, indices):
        seqs = [torch.as_tensor(self.sequences[i], dtype=torch.int64) for i in indices.tolist()]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = s
            attention_mask[row, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "sequence_index": indices,
                "epoch": self.epoch}

    def __iter__(self):
        batches = self._epoch_batches(self.epoch)
        while self.position < len(batches):
            indices = batches[self.position]
            self.position += 1  # counted before the yield: a checkpoint taken now resumes after it
            yield self._collate(indices)
        self.epoch += 1
        self.position = 0

    def state_dict(self):
        """Plain ints (safe for ``torch.load(weights_only=True)``): the reader's position and the
        settings it must be resumed with."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_sequences": len(self.sequences),
        }

    def load_state_dict(self, state):
        """Continue at the batch ``state`` names; the reader must have the same sequences count,
        batch size and seed as the one that wrote it."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"epoch", "position", "seed", "batch_size", "num_sequences"} - state.keys()
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_sequences"):
            if state[key] != mine[key]:
                raise ValueError(f"state[{key!r}] is {state[key]} but this reader has {mine[key]}")
        epoch = check_int("state['epoch']", state["epoch"], 0)
        position = check_int("state['position']", state["position"], 0)
        if position > len(self):
            raise ValueError(f"state['position'] is {position} but an epoch has {len(self)} batches")
        self.epoch, self.position = epoch, position
