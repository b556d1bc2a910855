"""Reference-guided inpainting triples of the digits: references of the same class but another
image, from the same split; holes; fixed evaluation sets."""

import pytest
import torch

from adaptdiff.data.digits import digits
from adaptdiff.data.inpainting import InpaintingData, hole_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("split", ["train", "test"])
def test_references_share_the_class_differ_in_image_and_stay_in_the_split(split):
    data = InpaintingData(16, split)
    t = data.batch(400, torch.Generator().manual_seed(0))
    assert torch.equal(data.labels[t.reference_index], t.labels)
    assert torch.equal(data.labels[t.target_index], t.labels)
    assert (t.reference_index != t.target_index).all()
    assert torch.equal(t.reference, data.images[t.reference_index])
    assert torch.equal(t.target, data.images[t.target_index])
    # another image, not only another index: no reference equals its target pixel for pixel
    assert (t.reference - t.target).flatten(1).abs().amax(1).min() > 0
    # split-safe: every reference is an image of this split and of no other
    other, _ = digits(16, "test" if split == "train" else "train")
    flat_other = {tuple(x.flatten().tolist()) for x in other}
    assert not any(tuple(r.flatten().tolist()) in flat_other for r in t.reference)


def test_references_cover_the_other_members_of_the_class():
    data = InpaintingData(16, "test", per_class=4)  # 4 images per class: 3 others each
    target = torch.full((300,), int(data.members[3][1]))
    refs = data.references(target, torch.Generator().manual_seed(1))
    assert set(refs.tolist()) == set(data.members[3].tolist()) - {int(target[0])}


def test_masked_target_and_mask_agree():
    data = InpaintingData(16, "train", mask="box")
    t = data.batch(64, torch.Generator().manual_seed(2))
    assert t.mask.shape == t.masked.shape == t.target.shape == (64, 1, 16, 16)
    assert torch.equal(t.masked, t.target * (1 - t.mask))
    assert torch.equal(t.masked[t.mask.bool()], torch.zeros(int(t.mask.sum())))


@pytest.mark.parametrize("kind", ["half", "box"])
def test_holes_hide_a_large_region(kind):
    masks = hole_masks(500, 16, kind, generator=torch.Generator().manual_seed(0))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    area = masks.flatten(1).mean(1)
    if kind == "half":
        assert torch.equal(area, torch.full((500,), 0.5))
        rows, cols = masks[:, 0].amax(2), masks[:, 0].amax(1)  # which rows / columns are hit
        vertical = cols.sum(1) == 8  # left or right half
        assert 100 < int(vertical.sum()) < 400  # both orientations drawn
        assert torch.equal(rows[vertical].sum(1), torch.full((int(vertical.sum()),), 16.0))
    else:
        assert area.min() >= 64 / 256 and area.max() <= 144 / 256
        assert area.std() > 0
    with pytest.raises(ValueError, match="hole_masks: kind"):
        hole_masks(2, 16, "ring")


def test_evaluation_is_balanced_and_fixed_by_its_seed():
    data = InpaintingData(16, "test")
    a, b, c = data.evaluation(25, seed=0), data.evaluation(25, seed=0), data.evaluation(25, seed=1)
    assert a.labels.tolist() == [i % 10 for i in range(25)]
    assert len(set(a.target_index.tolist())) == 25
    assert torch.equal(a.reference, b.reference) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.reference_index, c.reference_index)
    with pytest.raises(ValueError, match="InpaintingData.evaluation: n must be"):
        data.evaluation(301)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="InpaintingData: split"):
        InpaintingData(16, "all")
    with pytest.raises(ValueError, match="InpaintingData: mask"):
        InpaintingData(16, mask="ring")
    with pytest.raises(ValueError, match="InpaintingData: per_class"):
        InpaintingData(16, per_class=1)
