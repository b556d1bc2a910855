"""Visual question answering on the embedded digits: a tiny data set for vision-language models.

Every example is an image of ``16 × 32`` pixels (two 16×16 digit slots side by side, values in
[-1, 1], background -1), a question and its answer, both as character tokens:

- ``"name"``: one digit in the left slot (the right one blank): ``"which digit is it?"`` ->
  ``"seven"``;
- ``"parity"``: one digit in the left slot: ``"is it odd or even?"`` -> ``"odd"``;
- ``"sum"``: two digits side by side: ``"what is the sum?"`` -> ``"twelve"`` (number words up
  to eighteen).

A text row is the question, the answer and then :attr:`DigitQATokenizer.eos_id` up to
``text_len`` (the answer's end and the padding are the same token, as LLaDA pads its answers),
with a prompt mask over the question. Digits come from :func:`adaptdiff.data.digits` at 16×16,
so the ``"train"`` / ``"test"`` splits never share an image.
"""

from __future__ import annotations

import torch

from .digits import digits

KINDS = ("name", "parity", "sum")
QUESTIONS = {
    "name": "which digit is it?",
    "parity": "is it odd or even?",
    "sum": "what is the sum?",
}
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen"
).split()
SLOT = 16  # pixels per digit slot (height and width)


def answer_text(kind: str, labels: tuple[int, ...]) -> str:
    """The answer to question ``kind`` about the digits ``labels`` (one, or two for ``"sum"``)."""
    if kind not in KINDS:
        raise ValueError(f"answer_text: kind must be one of {KINDS}, got {kind!r}")
    want = 2 if kind == "sum" else 1
    if len(labels) != want or not all(0 <= int(d) <= 9 for d in labels):
        raise ValueError(f"answer_text: {kind!r} takes {want} digit(s) in 0..9, got {labels}")
    if kind == "name":
        return NUMBER_WORDS[int(labels[0])]
    if kind == "parity":
        return "odd" if int(labels[0]) % 2 else "even"
    return NUMBER_WORDS[int(labels[0]) + int(labels[1])]


class DigitQATokenizer:
    """Characters of the questions and answers, then ``eos_id`` and ``mask_id`` (the last id, as
    :class:`~adaptdiff.models.BlockLMConfig` expects); ``vocab_size`` counts both."""

    def __init__(self) -> None:
        text = "".join(QUESTIONS.values()) + "".join(NUMBER_WORDS) + "oddeven"
        self.chars = "".join(sorted(set(text)))
        self.eos_id = len(self.chars)
        self.mask_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2
        self._ids = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        bad = [c for c in text if c not in self._ids]
        if bad:
            raise ValueError(f"DigitQATokenizer.encode: {bad[0]!r} is not in the vocabulary")
        return torch.tensor([self._ids[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """Text of ``ids`` up to (not including) the first EOS; the mask shows as ``_``."""
        out = []
        for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if i == self.eos_id:
                break
            out.append("_" if i == self.mask_id else self.chars[i])
        return "".join(out)


def text_length(block_size: int = 1) -> int:
    """The shortest text row that holds every question, its longest answer and one EOS, rounded
    up to a multiple of ``block_size``."""
    longest = max(len(q) for q in QUESTIONS.values()) + max(len(w) for w in NUMBER_WORDS) + 1
    return -(-longest // block_size) * block_size


def compose(left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """Images ``[N, 1, 16, 16]`` (and optionally a right digit each) as ``[N, 1, 16, 32]``."""
    blank = torch.full_like(left, -1.0)
    return torch.cat([left, blank if right is None else right], dim=3)


def digit_qa(
    kind: str,
    count: int,
    *,
    split: str = "train",
    text_len: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``count`` examples of question ``kind`` from the digits of ``split`` (digits drawn with
    replacement by ``seed``).

    Returns ``images [count, 1, 16, 32]``, ``ids [count, text_len]`` (question, answer, EOS
    padding), ``prompt_mask [count, text_len]`` (True over the question), ``labels [count, 2]``
    (the right one -1 when blank) and ``prompt_len`` (a 0-d tensor: the question's length,
    shared by the rows). ``text_len`` defaults to :func:`text_length` ``()``.
    """
    if kind not in KINDS:
        raise ValueError(f"digit_qa: kind must be one of {KINDS}, got {kind!r}")
    if count < 1:
        raise ValueError(f"digit_qa: count must be >= 1, got {count}")
    text_len = text_len or text_length()
    if text_len < text_length():
        raise ValueError(f"digit_qa: text_len must be >= {text_length()}, got {text_len}")
    tok = DigitQATokenizer()
    images, labels = digits(SLOT, split)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(labels), (count, 2), generator=g)
    left = images[pick[:, 0]]
    right = images[pick[:, 1]] if kind == "sum" else None
    lab = labels[pick].clone()
    if kind != "sum":
        lab[:, 1] = -1
    question = tok.encode(QUESTIONS[kind])
    # every distinct row once (by the left digit, or the pair), then gathered
    q = len(question)
    rows = torch.full((100, text_len), tok.eos_id, dtype=torch.long)
    rows[:, :q] = question
    for left_right in range(100 if kind == "sum" else 10):
        pair = divmod(left_right, 10) if kind == "sum" else (left_right,)
        answer = tok.encode(answer_text(kind, pair))
        rows[left_right, q : q + len(answer)] = answer
    ids = rows[lab[:, 0] * 10 + lab[:, 1] if kind == "sum" else lab[:, 0]]
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, : len(question)] = True
    return dict(
        images=compose(left, right),
        ids=ids,
        prompt_mask=prompt_mask,
        labels=lab,
        prompt_len=torch.tensor(len(question)),
    )


def mixed_digit_qa(
    count: int, *, split: str = "train", text_len: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``count`` examples per question kind, concatenated (kind-major) and with ``kind [3 *
    count]`` (the index into :data:`KINDS`); ``prompt_len`` is dropped (it differs by kind)."""
    parts = [
        digit_qa(k, count, split=split, text_len=text_len, seed=seed + 7919 * i)
        for i, k in enumerate(KINDS)
    ]
    out = {
        key: torch.cat([p[key] for p in parts])
        for key in ("images", "ids", "prompt_mask", "labels")
    }
    out["kind"] = torch.arange(len(KINDS)).repeat_interleave(count)
    return out
