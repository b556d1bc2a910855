"""Sequence-to-sequence tasks built from the embedded pydoc corpus, at the word level.

The corpus (:func:`adaptdiff.data.pydoc_corpus`, all topics) is lower-cased and cut into words
(runs of ``a-z``); the word stream is cut into consecutive, non-overlapping windows of
``length`` words. Every 10th window is held out (``split="val"``), the others are
``"train"``, so the two never share a passage. A :class:`WordVocab` keeps the most frequent
words of the training windows; the rest read as ``<unk>``.

Tasks (source -> target, both ``length`` ids):

- ``"reverse"``: the source is the window, the target its words in reverse order
  (deterministic: a perfect model gets every pair right).
- ``"repair"``: the target is the window, the source the window with ``swaps`` random
  adjacent words exchanged (undoing them needs a model of the language; not every pair is
  recoverable, e.g. when the swapped words are equal or the swap reads as well).

:func:`exact_match` and :func:`token_accuracy` score predicted targets.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Sequence

import torch

from .text import pydoc_corpus

TASKS = ("reverse", "repair")
SPLITS = ("train", "val")
VAL_EVERY = 10  # every 10th window is held out
SPECIALS = ("<pad>", "<unk>", "<bos>")


@functools.cache
def _words() -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z]+", pydoc_corpus("all").lower()))


def corpus_words() -> list[str]:
    """The whole pydoc corpus as lower-case words (runs of ``a-z``), in order."""
    return list(_words())


def _window_mask(n: int, length: int, split: str) -> torch.Tensor:
    if split not in SPLITS:
        raise ValueError(f"seq2seq: split must be one of {SPLITS}, got {split!r}")
    if length < 2:
        raise ValueError(f"seq2seq: length must be >= 2, got {length}")
    held = torch.arange(n // length) % VAL_EVERY == VAL_EVERY - 1
    return held if split == "val" else ~held


def _windows(words, length: int, split: str) -> list[list[str]]:
    keep = _window_mask(len(words), length, split).tolist()
    return [list(words[i * length : (i + 1) * length]) for i, k in enumerate(keep) if k]


class WordVocab:
    """Words to ids and back: ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<bos>``, then ``words``
    (``vocab_size = 3 + len(words)``). :meth:`from_corpus` keeps the ``size`` most frequent
    words of the training windows (ties broken by first appearance)."""

    def __init__(self, words: list[str]):
        if len(set(words)) != len(words) or set(words) & set(SPECIALS):
            raise ValueError("WordVocab: words must be distinct and not special tokens")
        self.itos = list(SPECIALS) + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id = 0, 1, 2
        self.vocab_size = len(self.itos)

    @classmethod
    def from_corpus(cls, size: int = 256, length: int = 8) -> WordVocab:
        if size < 1:
            raise ValueError(f"WordVocab.from_corpus: size must be >= 1, got {size}")
        counts = collections.Counter(
            w for window in _windows(_words(), length, "train") for w in window
        )
        return cls([w for w, _ in counts.most_common(size)])

    def encode(self, words: Sequence[str]) -> torch.Tensor:
        """Words as a 1-D int64 tensor; a word outside the vocabulary becomes ``<unk>``."""
        return torch.tensor([self.stoi.get(w, self.unk_id) for w in words], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """A 1-D sequence of ids as words joined by spaces."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.dim() != 1:
            raise ValueError(f"WordVocab.decode: ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"WordVocab.decode: ids must lie in [0, {self.vocab_size}), "
                f"got [{int(ids.min())}, {int(ids.max())}]"
            )
        return " ".join(self.itos[i] for i in ids.tolist())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordVocab(vocab_size={self.vocab_size})"


def seq2seq_pairs(
    task: str,
    vocab: WordVocab,
    *,
    length: int = 8,
    split: str = "train",
    swaps: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)``, each ``[N, length]`` int64, one pair per window of ``split``.

    ``seed`` draws the swaps of ``"repair"`` (``swaps`` adjacent exchanges at random
    positions, applied one after the other); ``"reverse"`` ignores it.
    """
    if task not in TASKS:
        raise ValueError(f"seq2seq_pairs: task must be one of {TASKS}, got {task!r}")
    if swaps < 0:
        raise ValueError(f"seq2seq_pairs: swaps must be >= 0, got {swaps}")
    words = _words()
    keep = _window_mask(len(words), length, split)
    ids = vocab.encode(words[: len(keep) * length]).view(-1, length)[keep]  # [N, length]
    if task == "reverse":
        return ids, ids.flip(1)
    g = torch.Generator().manual_seed(seed)
    src = ids.clone()
    rows = torch.arange(len(ids))
    for _ in range(swaps):
        pos = torch.randint(0, length - 1, (len(ids),), generator=g)
        a, b = src[rows, pos].clone(), src[rows, pos + 1].clone()
        src[rows, pos], src[rows, pos + 1] = b, a
    return src, ids


def _check_pair(fn: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(
            f"{fn}: pred and target must be [N, L] of one shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )


def exact_match(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The fraction of rows of ``pred [N, L]`` equal to ``target`` in every position."""
    _check_pair("exact_match", pred, target)
    return float((pred == target).all(1).float().mean())


def token_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The fraction of positions of ``pred [N, L]`` equal to ``target``."""
    _check_pair("token_accuracy", pred, target)
    return float((pred == target).float().mean())
