"""distil.masking: token counts, frequency-smoothed target choice, 80/10/10 corruption, determinism."""
import math
from collections import Counter

import pytest
import torch

from distil.masking import MLMMasker, token_counts

import tiny

V = 50
PAD, UNK, CLS, SEP, MASK = range(5)
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def _batch(batch_size=8, seq_len=40, seed=0):
    return tiny.random_batch(V, batch_size, seq_len, cls_id=CLS, sep_id=SEP, pad_id=PAD, seed=seed)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_token_counts_match_a_counter():
    g = _gen(1)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 5, 17, 30)]
    ref = Counter(t for s in seqs for t in s)
    counts = token_counts(seqs, V)
    assert counts.dtype == torch.int64 and counts.shape == (V,)
    assert counts.tolist() == [ref[i] for i in range(V)]
    assert torch.equal(token_counts([torch.tensor(s, dtype=torch.int64) for s in seqs], V), counts)
    assert torch.equal(token_counts([], V), torch.zeros(V, dtype=torch.int64))


def test_token_counts_validates():
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        token_counts([[1, 2], [V]], V)
    with pytest.raises(ValueError, match=r"sequences\[0\]"):
        token_counts([[-1]], V)
    with pytest.raises(ValueError, match=r"sequences\[0\]"):
        token_counts([torch.ones(2, 2, dtype=torch.int64)], V)
    with pytest.raises(TypeError, match="sequences"):
        token_counts(5, V)
    with pytest.raises(TypeError, match="vocab_size"):
        token_counts([[1]], 5.0)


def test_token_weights_are_smoothed_inverse_counts():
    counts = torch.randint(0, 1000, (V,), generator=_gen(2))
    counts[7] = 0  # unseen token: weight as if seen once
    masker = MLMMasker(V, SPECIALS, MASK, counts=counts, smoothing=0.7)
    ref = counts.double().clamp_min(1).pow(-0.7)
    ref[SPECIALS] = 0
    assert masker.token_weights[7] == 1.0
    assert (masker.token_weights[SPECIALS] == 0).all()
    assert (masker.token_weights - ref).abs().max() <= 1e-6 * ref.max()


def test_targets_are_ceil_15_percent_of_real_tokens_never_special_or_pad():
    ids, attn = _batch()
    ids[1, 5] = UNK  # a special token inside the text: never a target either
    masker = MLMMasker(V, SPECIALS, MASK)
    masked, labels = masker(ids, attn, _gen())
    chosen = labels != -100
    assert int(chosen.sum()) == math.ceil(0.15 * int(attn.sum()))
    assert not chosen[attn == 0].any()
    for s in SPECIALS:
        assert not chosen[ids == s].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert masked.dtype == torch.int64 and masked.shape == ids.shape
    assert int(masked.min()) >= 0 and int(masked.max()) < V


def test_targets_are_capped_by_the_maskable_tokens():
    # each row: CLS, one word, SEP; ceil(0.9 * 9) = 9 > 3 maskable positions
    ids = torch.tensor([[CLS, 10, SEP], [CLS, 11, SEP], [CLS, 12, SEP]])
    masked, labels = MLMMasker(V, SPECIALS, MASK, mask_prop=0.9)(ids, torch.ones_like(ids), _gen())
    assert labels[:, 1].tolist() == [10, 11, 12] and (labels[:, [0, 2]] == -100).all()


@pytest.mark.parametrize("case", ["specials_only", "all_pad", "no_rows"])
def test_nothing_maskable_gives_no_targets(case):
    if case == "no_rows":
        ids = torch.zeros(0, 7, dtype=torch.int64)
        attn = torch.zeros_like(ids)
    else:
        ids = torch.tensor([[CLS, SEP, PAD], [CLS, SEP, PAD]]) if case == "specials_only" else torch.full((2, 3), PAD)
        attn = (ids != PAD).long()
    masked, labels = MLMMasker(V, SPECIALS, MASK)(ids, attn, _gen())
    assert torch.equal(masked, ids) and (labels == -100).all() and labels.shape == ids.shape


def test_deterministic_for_a_seed_and_fresh_per_call():
    ids, attn = _batch(seed=3)
    masker = MLMMasker(V, SPECIALS, MASK)
    a = masker(ids, attn, _gen(5))
    b = masker(ids, attn, _gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = _gen(5)
    first, second = masker(ids, attn, g), masker(ids, attn, g)
    assert torch.equal(first[1], a[1])
    assert not torch.equal(second[1], first[1])  # dynamic: a new draw each call
    assert not torch.equal(masker(ids, attn, _gen(6))[1], a[1])


def test_corruption_is_80_mask_10_keep_10_random():
    ids, attn = _batch(batch_size=64, seq_len=64, seed=4)
    masker = MLMMasker(V, SPECIALS, MASK)
    g = _gen(7)
    n = n_mask = n_keep = n_other = 0
    random_ids = []
    for _ in range(4):
        masked, labels = masker(ids, attn, g)
        chosen = labels != -100
        out, orig = masked[chosen], labels[chosen]
        n += out.numel()
        n_mask += int((out == MASK).sum())
        n_keep += int((out == orig).sum())
        n_other += int(((out != MASK) & (out != orig)).sum())
        random_ids.append(out[(out != MASK) & (out != orig)])
    # a random id equals the original (or [MASK]) with probability 1/V each; 5-sigma bounds
    p_rand_differs = 0.1 * (1 - 2 / V)
    for count, p in ((n_mask, 0.8 + 0.1 / V), (n_keep, 0.1 + 0.1 / V), (n_other, p_rand_differs)):
        assert abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (count, n, p)
    random_ids = torch.cat(random_ids)
    assert len(torch.unique(random_ids)) > V // 2  # spread over the vocabulary, not one id


def test_choice_follows_the_smoothed_frequencies():
    # 10 frequent tokens (count 1000) and 10 rare ones (count 10); one target per call
    counts = torch.ones(V, dtype=torch.int64)
    counts[10], counts[11] = 1000, 10
    ids = torch.tensor([[CLS] + [10] * 10 + [11] * 10 + [SEP]])
    masker = MLMMasker(V, SPECIALS, MASK, counts=counts, mask_prop=1 / 22)
    g = _gen(8)
    trials = 2000
    rare = sum(int(masker(ids, torch.ones_like(ids), g)[1].max()) == 11 for _ in range(trials))
    p = 1 / (1 + (1000 / 10) ** -0.7)  # weight ratio of rare to frequent: 100^0.7
    assert abs(rare / trials - p) <= 5 * math.sqrt(p * (1 - p) / trials), (rare, p)


def test_masker_validates():
    with pytest.raises(TypeError, match="vocab_size"):
        MLMMasker("50", SPECIALS, MASK)
    with pytest.raises(ValueError, match="mask_id"):
        MLMMasker(V, SPECIALS, V)
    with pytest.raises(ValueError, match=r"special_ids\[1\]"):
        MLMMasker(V, [0, -1], MASK)
    with pytest.raises(TypeError, match="special_ids"):
        MLMMasker(V, 3, MASK)
    with pytest.raises(ValueError, match="mask_prop"):
        MLMMasker(V, SPECIALS, MASK, mask_prop=0.0)
    with pytest.raises(ValueError, match="mask_prop"):
        MLMMasker(V, SPECIALS, MASK, mask_prop=1.5)
    with pytest.raises(ValueError, match="word_mask"):
        MLMMasker(V, SPECIALS, MASK, word_mask=0.5)
    with pytest.raises(ValueError, match="word_rand"):
        MLMMasker(V, SPECIALS, MASK, word_rand=float("nan"))
    with pytest.raises(ValueError, match="smoothing"):
        MLMMasker(V, SPECIALS, MASK, smoothing=-1.0)
    with pytest.raises(ValueError, match="counts"):
        MLMMasker(V, SPECIALS, MASK, counts=torch.ones(V - 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="counts"):
        MLMMasker(V, SPECIALS, MASK, counts=torch.ones(V))
    with pytest.raises(ValueError, match="counts"):
        MLMMasker(V, SPECIALS, MASK, counts=-torch.ones(V, dtype=torch.int64))
    masker = MLMMasker(V, SPECIALS, MASK)
    ids, attn = _batch()
    with pytest.raises(TypeError, match="input_ids"):
        masker(ids.int(), attn, _gen())
    with pytest.raises(ValueError, match="attention_mask"):
        masker(ids, attn[:, 1:], _gen())
    with pytest.raises(TypeError, match="generator"):
        masker(ids, attn, 0)
    with pytest.raises(ValueError, match="input_ids"):
        masker(ids + V, attn, _gen())
