"""Captions of the digits from their class names and measured attributes."""

import pytest
import torch

from adaptdiff.data.captions import (
    DIGIT_NAMES,
    VOCABULARY,
    caption,
    caption_thresholds,
    captions,
    digit_attributes,
    digit_captions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_caption_words():
    assert caption(7) == "a seven"
    assert caption(8) == "an eight"
    assert caption(7, "bold") == "a bold seven"
    assert caption(2, "thin", slanted=True) == "a thin, slanted two"
    assert caption(8, slanted=True) == "a slanted eight"
    with pytest.raises(ValueError, match="caption: label"):
        caption(10)
    with pytest.raises(ValueError, match="caption: weight"):
        caption(1, "heavy")


def test_attributes_measure_ink_and_slant():
    img = -torch.ones(3, 1, 16, 16)
    img[0, 0, 2:14, 7:9] = 1  # an upright bar
    img[1, 0, 2:14, 6:10] = 1  # a thicker upright bar
    for r in range(2, 14):  # a bar leaning right: the top further right
        c = 10 - (r - 2) // 2
        img[2, 0, r, c : c + 2] = 1
    ink, slant = digit_attributes(img)
    assert ink[1] == pytest.approx(2 * ink[0])
    assert abs(slant[0]) < 1e-6 and abs(slant[1]) < 1e-6
    assert slant[2] > 0.3
    with pytest.raises(ValueError, match="digit_attributes: images"):
        digit_attributes(torch.zeros(2, 16, 16))


def test_digit_captions_are_deterministic_and_cover_the_attributes():
    images, labels, texts = digit_captions(16, "test")
    assert len(texts) == len(labels) == 300
    assert texts == digit_captions(16, "test")[2]
    for text, label in zip(texts, labels.tolist(), strict=True):
        assert text.split()[-1] == DIGIT_NAMES[label]
        assert set(text.replace(",", "").split()) <= set(VOCABULARY)
    words = " ".join(texts)
    for word in ("bold", "thin", "slanted"):
        assert word in words
    thin, bold, slanted = caption_thresholds(16)
    assert thin < bold and slanted > 0
    # about a third of the training digits are bold and a third thin, by construction
    _, _, train = digit_captions(16, "train")
    share = sum("bold" in t for t in train) / len(train)
    assert 0.3 < share < 0.37
    with pytest.raises(ValueError, match="captions: labels"):
        captions(images, labels[:3])
