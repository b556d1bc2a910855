"""The Python standard library's help topics as a small text corpus that needs no download.

``pydoc_data.topics.topics`` maps about 80 topic names (``"assignment"``, ``"class"``, ...) to the
reference text that ``help()`` shows: ~465,000 characters on Python 3.11. The text differs between
Python versions, so a model's checkpoint should keep its tokenizer's ``chars``.
"""

from __future__ import annotations

import numpy as np
import torch

SPLITS = ("train", "val", "all")
VAL_EVERY = 10  # every 10th topic (in sorted order) is held out


def pydoc_corpus(split: str = "all") -> str:
    """The topics' texts in sorted topic order, joined by blank lines.

    ``split="val"`` holds every 10th topic (those at positions 9, 19, ...), ``"train"`` the
    others, so the two never share a passage.
    """
    if split not in SPLITS:
        raise ValueError(f"pydoc_corpus: split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split != "all":
        want_val = split == "val"
        names = [n for i, n in enumerate(names) if (i % VAL_EVERY == VAL_EVERY - 1) == want_val]
    return "\n\n".join(topics[n] for n in names)


class CharTokenizer:
    """Characters to ids and back, with one extra ``mask_id`` for masked diffusion LMs.

    The vocabulary is the sorted set of characters of ``text`` (by default the whole pydoc
    corpus), ids ``0 .. len(chars) - 1``; ``mask_id = len(chars)`` and ``vocab_size =
    len(chars) + 1``. ``CharTokenizer(tok.chars)`` rebuilds the same tokenizer.
    """

    def __init__(self, text: str | None = None, mask_str: str = "█"):
        if text is None:
            text = pydoc_corpus("all")
        if not text:
            raise ValueError("CharTokenizer: text must not be empty")
        self.chars = "".join(sorted(set(text)))
        self.mask_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self.mask_str = mask_str
        self._codes = _codepoints(self.chars)  # sorted, so ids come from a binary search

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D int64 tensor of ids; a character outside the vocabulary raises."""
        codes = _codepoints(text)
        ids = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
        bad = self._codes[ids] != codes
        if bad.any():
            char = chr(int(codes[np.argmax(bad)]))
            raise ValueError(
                f"CharTokenizer.encode: text has a character not in the vocabulary: {char!r}"
            )
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """A 1-D sequence of ids back to text; ``mask_id`` becomes ``mask_str``."""
        ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
        if ids.dim() != 1:
            raise ValueError(f"CharTokenizer.decode: ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() > self.mask_id):
            raise ValueError(
                f"CharTokenizer.decode: ids must lie in [0, {self.mask_id}], "
                f"got [{int(ids.min())}, {int(ids.max())}]"
            )
        table = list(self.chars) + [self.mask_str]
        return "".join(table[i] for i in ids.tolist())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id})"


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def text_windows(
    tokens: torch.Tensor,
    batch_size: int,
    length: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``batch_size`` training windows ``[batch_size, length]`` cut from ``tokens`` (1-D) at
    uniformly random starts (``generator``, a CPU generator, makes them reproducible)."""
    if tokens.dim() != 1:
        raise ValueError(f"text_windows: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if length < 1 or length > tokens.numel():
        raise ValueError(
            f"text_windows: length must be in [1, {tokens.numel()}] (the tokens), got {length}"
        )
    if batch_size < 1:
        raise ValueError(f"text_windows: batch_size must be >= 1, got {batch_size}")
    starts = torch.randint(0, tokens.numel() - length + 1, (batch_size,), generator=generator)
    index = starts.to(tokens.device)[:, None] + torch.arange(length, device=tokens.device)
    return tokens[index].to(device)
