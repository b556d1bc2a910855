import pytest
import torch

from adaptdiff.data import CharTokenizer, pydoc_corpus, text_windows


def test_corpus_is_fixed_and_split():
    corpus = pydoc_corpus()
    assert isinstance(corpus, str) and len(corpus) > 100_000
    assert pydoc_corpus() == corpus
    train, val = pydoc_corpus("train"), pydoc_corpus("val")
    assert 0 < len(val) < len(train) < len(corpus)
    assert val[:200] not in train and train[:200] not in val
    with pytest.raises(ValueError, match="split"):
        pydoc_corpus("test")


def test_tokenizer_round_trips_the_corpus():
    corpus = pydoc_corpus()
    tok = CharTokenizer()
    ids = tok.encode(corpus)
    assert ids.dtype == torch.int64 and ids.shape == (len(corpus),)
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.mask_id
    assert tok.decode(ids) == corpus
    assert tok.mask_id == tok.vocab_size - 1 == len(tok.chars) == len(tok) - 1
    assert CharTokenizer(tok.chars).chars == tok.chars


def test_tokenizer_mask_and_errors():
    tok = CharTokenizer("abca")
    assert tok.chars == "abc" and tok.vocab_size == 4
    assert tok.encode("cab").tolist() == [2, 0, 1]
    assert tok.encode("").shape == (0,)
    assert tok.decode([0, tok.mask_id, 2]) == "a█c"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([0, 4])


def test_text_windows():
    tokens = torch.arange(1000)
    windows = text_windows(tokens, 8, 32, generator=torch.Generator().manual_seed(0))
    assert windows.shape == (8, 32) and windows.dtype == tokens.dtype
    # each window is a contiguous slice
    assert (windows.diff(dim=1) == 1).all()
    again = text_windows(tokens, 8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(windows, again)
    whole = text_windows(tokens, 2, 1000)
    assert torch.equal(whole[0], tokens)
    with pytest.raises(ValueError, match="length"):
        text_windows(tokens, 2, 1001)
