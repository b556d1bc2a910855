"""The verifiable RL tasks: every generated answer is right, batches pad as documented, and the
rewards score exactly."""

import pytest
import torch

from adaptdiff.data.rl_tasks import (
    TASKS,
    char_accuracy,
    exact_match_reward,
    is_balanced,
    task_batch,
    task_example,
    task_lengths,
)
from adaptdiff.data.text import CharTokenizer, pydoc_corpus


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


def test_answers_are_correct():
    g = torch.Generator().manual_seed(0)
    corpus = pydoc_corpus("all")
    seen_balanced = set()
    for _ in range(200):
        p, a = task_example("add", g, digits=3)
        x, y = p[1:-1].split("+")
        assert p[0] == "a" and p[-1] == "=" and len(x) == len(y) == 3
        assert a == str(int(x) + int(y)).zfill(4)
        p, a = task_example("sort", g)
        assert a == "".join(sorted(p[1:-1])) and len(a) == 4
        p, a = task_example("brackets", g)
        assert set(p[1:-1]) <= set("()[]") and len(p) == 8
        assert a == ("y" if is_balanced(p[1:-1]) else "n")
        seen_balanced.add(a)
        p, a = task_example("copy", g)
        assert p == f"c{a}=" and len(a) == 4 and a in corpus
    assert seen_balanced == {"y", "n"}


def test_is_balanced():
    assert is_balanced("([])[]") and is_balanced("")
    assert not is_balanced("([)]") and not is_balanced("((") and not is_balanced("])")


def test_batch_pads_prompts_left_and_answers_right(tok):
    b = task_batch(tok, 12, answer_len=8, generator=torch.Generator().manual_seed(1))
    assert task_lengths() == (8, 4)
    assert b.prompts.shape == (12, 8) and b.answers.shape == (12, 8)
    assert set(b.kinds) <= set(TASKS) and len(b.texts) == 12
    for prompt, answer, (p, a) in zip(b.prompts, b.answers, b.texts, strict=True):
        assert tok.decode(prompt) == p.rjust(8) and tok.decode(answer) == a + "\n" * (8 - len(a))
    # reproducible from the generator
    again = task_batch(tok, 12, answer_len=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.prompts, b.prompts) and again.texts == b.texts


def test_rewards(tok):
    answers = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    generated = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [0, 8, 9, 9]])
    assert exact_match_reward(generated, answers).tolist() == [1.0, 0.0, 0.0]
    assert char_accuracy(generated, answers).tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert exact_match_reward(generated[:, :2], answers).tolist() == [0.0, 0.0, 0.0]


def test_bad_input_is_refused(tok):
    g = torch.Generator()
    with pytest.raises(ValueError, match="task_example: kind must be one of"):
        task_example("divide", g)
    with pytest.raises(ValueError, match="task_batch: answer_len"):
        task_batch(tok, 2, answer_len=2)
    with pytest.raises(ValueError, match="task_batch: kinds"):
        task_batch(tok, 2, kinds=())
    with pytest.raises(ValueError, match="exact_match_reward: need"):
        exact_match_reward(torch.zeros(2, 3), torch.zeros(3, 3))
