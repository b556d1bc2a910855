"""The diffusia study: its training loop and the quick run end to end."""

import dataclasses
import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data.seq2seq import WordVocab, seq2seq_pairs
from adaptdiff.studies import get_study
from adaptdiff.studies.diffusia import ROWS, DiffusiaConfig, decode, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("kind", ["spiral", "ar"])
def test_training_is_reproducible_and_calls_back_at_half(kind):
    cfg = DiffusiaConfig(vocab=16, length=4, train_steps=6, batch=8, sample_steps=2)
    vocab = WordVocab.from_corpus(cfg.vocab, cfg.length)
    train = seq2seq_pairs("reverse", vocab, length=cfg.length, split="train")
    calls = []
    a, _ = train_model(kind, cfg, vocab, train, seed=0, at_half=lambda m: calls.append(m.training))
    b, _ = train_model(kind, cfg, vocab, train, seed=0)
    assert calls == [False]  # once, in eval mode
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    fresh = type(a)(a.config) if kind == "spiral" else None
    if fresh is not None:  # training moved the weights
        assert not torch.equal(fresh.embed.weight, a.embed.weight)
    c, _ = train_model(kind, dataclasses.replace(cfg, cosine=False), vocab, train, seed=0)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))  # another schedule
    pred = decode(kind, a, train[0][:3], cfg, seed=0)
    assert pred.shape == (3, 4) and pred.max() < vocab.vocab_size


def test_diffusia_quick_runs_every_model(tmp_path, capsys):
    assert main(["study", "diffusia", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("diffusia").quick(DiffusiaConfig())
    rows = result["summary"]
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        for metric in ("exact_half", "exact", "token_acc"):
            assert 0.0 <= row[metric]["mean"] <= 1.0
        assert row["tokens_per_s"]["mean"] > 0
        assert row["nfe"]["mean"] == (cfg.length if name == "enc-dec AR" else cfg.sample_steps)
    # the spiral adds the encoder's cross-attention to the plain wiring
    assert (
        rows["DiffuSIA (spiral)"]["params"]["mean"]
        > rows["plain enc-dec diffusion"]["params"]["mean"]
    )
    assert (tmp_path / "diffusia.png").exists()
    assert "DiffuSIA (spiral)" in capsys.readouterr().out
