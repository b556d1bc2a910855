"""The word-level sequence-to-sequence tasks from the pydoc corpus and their metrics."""

import pytest
import torch

from adaptdiff.data.seq2seq import (
    WordVocab,
    corpus_words,
    exact_match,
    seq2seq_pairs,
    token_accuracy,
)


@pytest.fixture(scope="module")
def vocab():
    return WordVocab.from_corpus(64)


def test_vocab_round_trip_and_unknown_words(vocab):
    assert vocab.vocab_size == 67 and vocab.itos[:3] == ["<pad>", "<unk>", "<bos>"]
    assert "the" in vocab.stoi  # the most frequent word of the corpus
    ids = vocab.encode(["the", "zzzzqqq", "of"])
    assert ids[1] == vocab.unk_id and vocab.decode(ids) == "the <unk> of"
    with pytest.raises(ValueError, match="WordVocab.decode: ids must lie in"):
        vocab.decode([0, 67])
    with pytest.raises(ValueError, match="WordVocab: words must be distinct"):
        WordVocab(["a", "a"])


def test_reverse_pairs_and_the_held_out_split(vocab):
    src, tgt = seq2seq_pairs("reverse", vocab, length=8, split="train")
    vsrc, vtgt = seq2seq_pairs("reverse", vocab, length=8, split="val")
    assert src.shape[1] == 8 and torch.equal(tgt, src.flip(1)) and torch.equal(vtgt, vsrc.flip(1))
    windows = len(corpus_words()) // 8
    assert len(src) + len(vsrc) == windows and len(vsrc) == windows // 10
    # the first held-out window is window 9 of the word stream
    assert vocab.decode(vsrc[0]) == vocab.decode(vocab.encode(corpus_words()[72:80]))


def test_repair_pairs_swap_adjacent_words(vocab):
    src, tgt = seq2seq_pairs("repair", vocab, length=6, split="val", swaps=1, seed=3)
    assert src.shape == tgt.shape
    differs = src != tgt
    changed = differs.any(1)
    assert changed.float().mean() > 0.6  # equal neighbours (often two <unk>) hide a swap
    for s, t, d in zip(src[changed], tgt[changed], differs[changed], strict=True):
        (pos,) = d.nonzero(as_tuple=True)
        assert len(pos) == 2 and pos[1] == pos[0] + 1
        assert s[pos[0]] == t[pos[1]] and s[pos[1]] == t[pos[0]]
    again, _ = seq2seq_pairs("repair", vocab, length=6, split="val", swaps=1, seed=3)
    assert torch.equal(src, again)
    zero, tgt0 = seq2seq_pairs("repair", vocab, length=6, split="val", swaps=0)
    assert torch.equal(zero, tgt0)


def test_bad_arguments_are_refused(vocab):
    with pytest.raises(ValueError, match="seq2seq_pairs: task must be one of"):
        seq2seq_pairs("sort", vocab)
    with pytest.raises(ValueError, match="seq2seq: split must be one of"):
        seq2seq_pairs("reverse", vocab, split="test")
    with pytest.raises(ValueError, match="seq2seq: length must be >= 2"):
        seq2seq_pairs("reverse", vocab, length=1)
    with pytest.raises(ValueError, match="seq2seq_pairs: swaps must be >= 0"):
        seq2seq_pairs("repair", vocab, swaps=-1)


def test_metrics_on_a_hand_case():
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    pred = torch.tensor([[1, 2, 3], [4, 0, 6]])
    assert exact_match(pred, target) == 0.5
    assert token_accuracy(pred, target) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="exact_match: pred and target must be"):
        exact_match(pred[:, :2], target)
    with pytest.raises(ValueError, match="token_accuracy: pred and target must be"):
        token_accuracy(pred[0], target[0])
