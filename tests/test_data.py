"""distil.data: corpus tokenisation, splitting and filtering; length-grouped, seeded, resumable batches."""
import io
from collections import Counter

import pytest
import torch

from distil.data import LengthGroupedBatches, load_corpus

import tiny


@pytest.fixture(scope="module")
def bert_tok():
    return tiny.bert_tokenizer()


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _reference(tokenizer, lines):
    # whole-line encoding with the tokenizer's own specials, then the paper's two filters
    out = []
    for line in lines:
        ids = tokenizer(line)["input_ids"]
        if len(ids) > 11 and ids.count(tokenizer.unk_token_id) < 0.5 * len(ids):
            out.append(ids)
    return out


# ---------------------------------------------------------------- load_corpus
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_load_corpus_equals_per_line_encoding(tmp_path, arch, bert_tok):
    tokenizer = bert_tok if arch == "bert" else tiny.roberta_tokenizer()
    paths = tiny.write_corpus(tmp_path, n_files=2, n_lines=40, seed=3, min_words=1, max_words=30)
    lines = [line for p in paths for line in p.read_text(encoding="utf-8").splitlines()]
    ref = _reference(tokenizer, lines)
    assert 0 < len(ref) < len(lines)  # the short-line filter did act
    assert load_corpus(paths, tokenizer) == ref
    assert load_corpus([str(p) for p in paths], tokenizer) == ref
    first = tokenizer.cls_token_id
    assert all(s[0] == first and s[-1] == tokenizer.sep_token_id for s in ref)


def test_long_lines_are_split_into_framed_pieces(tmp_path, bert_tok):
    words = tiny.corpus_lines(1, seed=9, min_words=200, max_words=200)[0]
    content = bert_tok(words, add_special_tokens=False)["input_ids"]
    assert len(content) > 3 * 30
    seqs = load_corpus(_write(tmp_path, "long.txt", [words]), bert_tok, max_length=32)
    cls_id, sep_id = bert_tok.cls_token_id, bert_tok.sep_token_id
    assert all(s[0] == cls_id and s[-1] == sep_id and len(s) <= 32 for s in seqs)
    assert all(len(s) == 32 for s in seqs[:-1])
    tail = len(content) % 30
    kept = content if tail == 0 or tail + 2 >= 12 else content[: len(content) - tail]
    assert [t for s in seqs for t in s[1:-1]] == kept


def test_split_boundaries_and_filters(tmp_path, bert_tok):
    the, unk = "the", "\u2603"  # one token each: a known word, and a symbol the vocabulary lacks
    assert bert_tok.tokenize(the) == ["the"] and bert_tok.tokenize(unk) == ["[UNK]"]
    lines = [
        " ".join([the] * 9),  # 11 tokens framed: dropped
        " ".join([the] * 10),  # 12: kept
        "",  # blank: skipped
        " ".join([unk] * 6 + [the] * 4),  # 6 UNK of 12: dropped
        " ".join([unk] * 5 + [the] * 5),  # 5 UNK of 12: kept
        " ".join([the] * 40),  # max_length 32: 30 + 10 content tokens, both pieces kept
        " ".join([the] * 39),  # 30 + 9: the 11-token tail is dropped
    ]
    seqs = load_corpus(_write(tmp_path, "edge.txt", lines), bert_tok, max_length=32)
    assert [len(s) for s in seqs] == [12, 12, 32, 12, 32]
    assert seqs[1].count(bert_tok.unk_token_id) == 5


def test_load_corpus_validates(tmp_path, bert_tok):
    path = _write(tmp_path, "a.txt", ["the of the"])
    with pytest.raises(ValueError, match="paths"):
        load_corpus([tmp_path / "missing.txt"], bert_tok)
    with pytest.raises(ValueError, match="paths"):
        load_corpus(tmp_path, bert_tok)  # a folder: the caller lists its files
    with pytest.raises(TypeError, match="paths"):
        load_corpus(5, bert_tok)
    with pytest.raises(TypeError, match="paths"):
        load_corpus([path, 5], bert_tok)
    with pytest.raises(TypeError, match="tokenizer"):
        load_corpus(path, object())
    with pytest.raises(ValueError, match="max_length"):
        load_corpus(path, bert_tok, max_length=2)
    with pytest.raises(TypeError, match="max_length"):
        load_corpus(path, bert_tok, max_length=32.0)
    assert load_corpus([], bert_tok) == []


# ---------------------------------------------------------------- LengthGroupedBatches
PAD = 0


def _sequences(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 200, (n,), generator=g).tolist()
    return [torch.randint(1, 100, (n_tok,), generator=g).tolist() for n_tok in lengths]


def _unpad(batch):
    return [tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])]


def _all(reader):
    return [_unpad(b) for b in reader]


def test_each_epoch_yields_every_sequence_once_padded():
    seqs = _sequences()
    reader = LengthGroupedBatches(seqs, 8, seed=1, pad_id=PAD)
    assert len(reader) == 63
    for epoch in range(2):
        assert reader.epoch == epoch
        batches = list(reader)
        assert len(batches) == 63
        assert sorted(len(b["input_ids"]) for b in batches) == [500 % 8] + [8] * 62
        seen = Counter()
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape
            assert ids.shape[1] == int(mask.sum(1).max())  # padded to the batch's longest only
            assert (ids[mask == 0] == PAD).all()
            assert torch.equal(mask, (torch.arange(ids.shape[1]) < mask.sum(1, keepdim=True)).long())
            seen.update(_unpad(b))
        assert seen == Counter(tuple(s) for s in seqs)
    assert reader.epoch == 2


def _padding_fraction(batch_lengths):
    pads = sum(max(b) * len(b) - sum(b) for b in batch_lengths)
    return pads / sum(max(b) * len(b) for b in batch_lengths)


def test_batches_are_grouped_by_length():
    seqs = _sequences()
    grouped = [b["attention_mask"].sum(1).tolist() for b in LengthGroupedBatches(seqs, 8, seed=1, pad_id=PAD)]
    lengths = torch.tensor([len(s) for s in seqs])
    shuffled = lengths[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))]
    ungrouped = [b.tolist() for b in shuffled.split(8)]
    assert _padding_fraction(ungrouped) > 0.3  # random batches of lengths 12..199 waste a lot
    assert _padding_fraction(grouped) < 0.1 * _padding_fraction(ungrouped)


def test_order_is_fixed_by_seed_and_epoch():
    seqs = _sequences(200)
    a = LengthGroupedBatches(seqs, 4, seed=7, pad_id=PAD)
    b = LengthGroupedBatches(seqs, 4, seed=7, pad_id=PAD)
    a0, a1 = _all(a), _all(a)
    assert _all(b) == a0 and _all(b) == a1
    assert a1 != a0
    assert _all(LengthGroupedBatches(seqs, 4, seed=8, pad_id=PAD)) != a0


@pytest.mark.parametrize("stop_at", [0, 5, 49, 50, 53])  # 50 batches per epoch
def test_resume_continues_at_the_exact_batch(stop_at):
    seqs = _sequences(200)
    straight = LengthGroupedBatches(seqs, 4, seed=3, pad_id=PAD)
    expected = _all(straight) + _all(straight)

    first = LengthGroupedBatches(seqs, 4, seed=3, pad_id=PAD)
    consumed = []
    while len(consumed) < stop_at:
        for batch in first:
            consumed.append(_unpad(batch))
            if len(consumed) == stop_at:
                break
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = LengthGroupedBatches(seqs, 4, seed=3, pad_id=PAD)
    resumed.load_state_dict(state)
    rest = []
    while resumed.epoch < 2:
        rest.extend(_all(resumed))
    assert consumed + rest == expected


def test_an_abandoned_pass_continues_where_it_stopped():
    seqs = _sequences(100)
    reader = LengthGroupedBatches(seqs, 10, seed=0, pad_id=PAD)
    expected = _all(LengthGroupedBatches(seqs, 10, seed=0, pad_id=PAD))
    got = []
    for batch in reader:
        got.append(_unpad(batch))
        if len(got) == 3:
            break
    assert reader.state_dict()["position"] == 3 and reader.epoch == 0
    got.extend(_all(reader))
    assert got == expected and reader.epoch == 1


def test_empty_corpus_gives_empty_epochs():
    reader = LengthGroupedBatches([], 4, seed=0, pad_id=PAD)
    assert len(reader) == 0 and list(reader) == [] and reader.epoch == 1


def test_batches_validate():
    seqs = _sequences(20)
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatches(seqs, 0, seed=0, pad_id=PAD)
    with pytest.raises(ValueError, match="seed"):
        LengthGroupedBatches(seqs, 4, seed=-1, pad_id=PAD)
    with pytest.raises(TypeError, match="pad_id"):
        LengthGroupedBatches(seqs, 4, seed=0, pad_id="0")
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        LengthGroupedBatches([[1, 2], []], 4, seed=0, pad_id=PAD)
    with pytest.raises(TypeError, match="sequences"):
        LengthGroupedBatches("abc", 4, seed=0, pad_id=PAD)
    reader = LengthGroupedBatches(seqs, 4, seed=0, pad_id=PAD)
    state = reader.state_dict()
    for key in ("seed", "batch_size", "num_sequences"):  # a state written by a different reader
        with pytest.raises(ValueError, match=key):
            reader.load_state_dict({**state, key: state[key] + 1})
    with pytest.raises(ValueError, match="position"):
        reader.load_state_dict({**state, "position": 6})
    with pytest.raises(ValueError, match="missing"):
        reader.load_state_dict({"epoch": 0})
    with pytest.raises(TypeError, match="state"):
        reader.load_state_dict([0, 0])
