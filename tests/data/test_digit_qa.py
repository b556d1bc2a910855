"""Digit questions: answers, tokenizer, rows, images and splits."""

import pytest
import torch

from adaptdiff.data import digits
from adaptdiff.data.digit_qa import (
    KINDS,
    QUESTIONS,
    DigitQATokenizer,
    answer_text,
    digit_qa,
    mixed_digit_qa,
    text_length,
)


def test_answers():
    assert answer_text("name", (7,)) == "seven"
    assert answer_text("parity", (7,)) == "odd" and answer_text("parity", (0,)) == "even"
    assert answer_text("sum", (9, 9)) == "eighteen" and answer_text("sum", (0, 3)) == "three"
    with pytest.raises(ValueError, match="answer_text: 'sum' takes 2 digit"):
        answer_text("sum", (3,))
    with pytest.raises(ValueError, match="answer_text: 'name' takes 1 digit"):
        answer_text("name", (12,))
    with pytest.raises(ValueError, match="answer_text: kind must be one of"):
        answer_text("colour", (1,))


def test_tokenizer_round_trip_and_special_ids():
    tok = DigitQATokenizer()
    assert tok.mask_id == tok.vocab_size - 1 and tok.eos_id == tok.vocab_size - 2
    text = QUESTIONS["sum"] + "seventeen"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.cat([ids, torch.tensor([tok.eos_id, 0])])) == text  # stops at EOS
    assert tok.decode([tok.mask_id]) == "_"
    with pytest.raises(ValueError, match="'!' is not in the vocabulary"):
        tok.encode("odd!")


def test_rows_hold_question_answer_and_eos_padding():
    tok = DigitQATokenizer()
    assert text_length(4) % 4 == 0 and text_length(4) >= text_length()
    for kind in KINDS:
        d = digit_qa(kind, 12, split="test", text_len=text_length(4), seed=3)
        p = int(d["prompt_len"])
        assert p == len(QUESTIONS[kind])
        assert d["images"].shape == (12, 1, 16, 32) and d["ids"].shape == (12, text_length(4))
        assert d["prompt_mask"][:, :p].all() and not d["prompt_mask"][:, p:].any()
        for r in range(12):
            digits_r = tuple(int(v) for v in d["labels"][r] if v >= 0)
            assert len(digits_r) == (2 if kind == "sum" else 1)
            answer = answer_text(kind, digits_r)
            row = d["ids"][r]
            assert tok.decode(row) == QUESTIONS[kind] + answer
            assert (row[p + len(answer) :] == tok.eos_id).all()  # EOS to the end
        right = d["images"][..., 16:]
        if kind == "sum":
            assert (right > -1).any(dim=(1, 2, 3)).all()  # a digit in each right slot
        else:
            assert (right == -1).all()  # blank


def test_images_are_the_digits_of_the_split_and_seeded():
    test_images, test_labels = digits(16, "test")
    d = digit_qa("sum", 6, split="test", seed=1)
    for r in range(6):
        for slot in range(2):
            img = d["images"][r, :, :, 16 * slot : 16 * (slot + 1)]
            match = (test_images == img).flatten(1).all(1).nonzero().flatten()
            assert len(match) and int(test_labels[match[0]]) == int(d["labels"][r, slot])
    assert torch.equal(digit_qa("sum", 6, split="test", seed=1)["ids"], d["ids"])
    assert not torch.equal(digit_qa("sum", 6, split="test", seed=2)["labels"], d["labels"])


def test_mixed_and_bad_arguments():
    m = mixed_digit_qa(5, split="test")
    assert m["ids"].shape[0] == 15 and m["kind"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(ValueError, match="digit_qa: kind must be one of"):
        digit_qa("colour", 3)
    with pytest.raises(ValueError, match="digit_qa: count must be >= 1"):
        digit_qa("name", 0)
    with pytest.raises(ValueError, match="digit_qa: text_len must be >= "):
        digit_qa("name", 3, text_len=10)
