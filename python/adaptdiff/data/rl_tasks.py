"""Verifiable tasks generated in code, with exact-match rewards, for reinforcement learning of
(block-diffusion) LMs: nothing is downloaded and every answer is checked exactly.

Each task writes a one-letter tag, its input and ``=``; the answer follows:

- ``"add"``: ``a12+34=`` -> ``046`` (two numbers of ``digits`` digits, the sum zero-padded to
  ``digits + 1``);
- ``"sort"``: ``s3142=`` -> ``1234`` (``digits + 2`` random digits, sorted);
- ``"brackets"``: ``b([)]=`` -> ``n`` (is the string of ``()[]`` of length ``2 * digits + 2``
  balanced: ``y`` or ``n``; half the drawn strings are balanced);
- ``"copy"``: ``c<text>=`` -> ``<text>`` (``digits + 2`` characters cut from a line of the
  embedded pydoc corpus).

:func:`task_batch` draws a batch of mixed tasks as token ids of a
:class:`~adaptdiff.data.text.CharTokenizer`: prompts left-padded with spaces to one length
(the block decoders need rows of equal prompt length), answers right-padded with newlines to one
length, so a model has to produce exactly ``answers`` and :func:`exact_match_reward` compares the
whole answer span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .text import CharTokenizer, pydoc_corpus

TASKS = ("add", "sort", "brackets", "copy")
PAD, END = " ", "\n"  # prompt padding (left), answer padding (right)


def _digits(n: int, g: torch.Generator) -> str:
    return "".join(str(d) for d in torch.randint(0, 10, (n,), generator=g).tolist())


def _balanced(n: int, g: torch.Generator) -> str:
    """A random balanced string of ``n`` (even) brackets of two kinds."""
    out, stack = [], []
    for i in range(n):
        left = n - i  # characters still to write
        if stack and (left == len(stack) or torch.rand((), generator=g) < 0.5):
            out.append(stack.pop())
        else:
            opening = "(" if torch.rand((), generator=g) < 0.5 else "["
            out.append(opening)
            stack.append(")" if opening == "(" else "]")
    return "".join(out)


def is_balanced(text: str) -> bool:
    """Whether ``text`` (of ``()[]``) is a balanced bracket string."""
    pairs, stack = {")": "(", "]": "["}, []
    for c in text:
        if c in "([":
            stack.append(c)
        elif not stack or stack.pop() != pairs[c]:
            return False
    return not stack


_LINES: list[str] | None = None


def _corpus_lines() -> list[str]:
    global _LINES
    if _LINES is None:
        _LINES = [s for s in (line.strip() for line in pydoc_corpus("all").split("\n")) if s]
    return _LINES


def task_example(kind: str, g: torch.Generator, *, digits: int = 2) -> tuple[str, str]:
    """One ``(prompt, answer)`` of task ``kind`` (see the module docstring)."""
    if kind not in TASKS:
        raise ValueError(f"task_example: kind must be one of {TASKS}, got {kind!r}")
    if digits < 1:
        raise ValueError(f"task_example: digits must be >= 1, got {digits}")
    if kind == "add":
        a, b = _digits(digits, g), _digits(digits, g)
        return f"a{a}+{b}=", str(int(a) + int(b)).zfill(digits + 1)
    if kind == "sort":
        x = _digits(digits + 2, g)
        return f"s{x}=", "".join(sorted(x))
    if kind == "brackets":
        n = 2 * digits + 2
        if torch.rand((), generator=g) < 0.5:
            x = _balanced(n, g)
        else:
            x = "".join("()[]"[i] for i in torch.randint(0, 4, (n,), generator=g).tolist())
        return f"b{x}=", "y" if is_balanced(x) else "n"
    n = digits + 2
    lines = [s for s in _corpus_lines() if len(s) >= n]
    line = lines[int(torch.randint(0, len(lines), (), generator=g))]
    start = int(torch.randint(0, len(line) - n + 1, (), generator=g))
    x = line[start : start + n]
    return f"c{x}=", x


def task_lengths(kinds: Sequence[str] = TASKS, *, digits: int = 2) -> tuple[int, int]:
    """The longest prompt and answer among ``kinds`` (the padded lengths of a batch)."""
    g = torch.Generator().manual_seed(0)
    pairs = [task_example(k, g, digits=digits) for k in kinds]
    return max(len(p) for p, _ in pairs), max(len(a) for _, a in pairs)


@dataclass
class TaskBatch:
    """``prompts [N, P]`` and ``answers [N, A]`` (token ids), the ``kinds`` and the unpadded
    texts of each row."""

    prompts: Tensor
    answers: Tensor
    kinds: list[str]
    texts: list[tuple[str, str]]


def task_batch(
    tokenizer: CharTokenizer,
    n: int,
    *,
    kinds: Sequence[str] = TASKS,
    digits: int = 2,
    answer_len: int | None = None,
    generator: torch.Generator | None = None,
) -> TaskBatch:
    """``n`` tasks, kinds drawn uniformly from ``kinds``; prompts left-padded with spaces to the
    longest prompt of ``kinds``, answers right-padded with newlines to ``answer_len`` (default:
    the longest answer of ``kinds``)."""
    if n < 1:
        raise ValueError(f"task_batch: n must be >= 1, got {n}")
    if not kinds or any(k not in TASKS for k in kinds):
        raise ValueError(f"task_batch: kinds must be a non-empty subset of {TASKS}, got {kinds}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p_len, a_len = task_lengths(kinds, digits=digits)
    if answer_len is not None:
        if answer_len < a_len:
            raise ValueError(
                f"task_batch: answer_len ({answer_len}) is shorter than the longest answer "
                f"({a_len})"
            )
        a_len = answer_len
    picks = torch.randint(0, len(kinds), (n,), generator=g).tolist()
    texts = [task_example(kinds[i], g, digits=digits) for i in picks]
    prompts = torch.stack([tokenizer.encode(p.rjust(p_len, PAD)) for p, _ in texts])
    answers = torch.stack([tokenizer.encode(a.ljust(a_len, END)) for _, a in texts])
    return TaskBatch(prompts, answers, [kinds[i] for i in picks], texts)


def exact_match_reward(generated: Tensor, answers: Tensor) -> Tensor:
    """1.0 where the first ``A`` generated tokens of a row equal its answer ``[N, A]``, else 0.0
    (``generated [N, >= A]``; a shorter generation scores 0)."""
    if generated.dim() != 2 or answers.dim() != 2 or generated.shape[0] != answers.shape[0]:
        raise ValueError(
            f"exact_match_reward: need generated [N, G] and answers [N, A], got "
            f"{tuple(generated.shape)} and {tuple(answers.shape)}"
        )
    a = answers.shape[1]
    if generated.shape[1] < a:
        return torch.zeros(generated.shape[0])
    return (generated[:, :a] == answers).all(1).float()


def char_accuracy(generated: Tensor, answers: Tensor) -> Tensor:
    """Per row, the fraction of answer positions generated correctly (a partial-credit view)."""
    a = min(answers.shape[1], generated.shape[1])
    return (generated[:, :a] == answers[:, :a]).float().sum(1) / answers.shape[1]
