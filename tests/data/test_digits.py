import pytest
import torch

from adaptdiff.data import batches, digits
from adaptdiff.data.digits import NUM_CLASSES, TEST_PER_CLASS, split_indices


@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_dtypes_range(size):
    images, labels = digits(size, "all")
    assert images.shape == (1797, 1, size, size) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0  # blank background and full strokes
    assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_split_is_balanced_disjoint_and_complete():
    all_images, all_labels = digits(16, "all")
    train = split_indices(all_labels.numpy(), "train", seed=0)
    test = split_indices(all_labels.numpy(), "test", seed=0)
    assert len(test) == NUM_CLASSES * TEST_PER_CLASS
    assert sorted(train.tolist() + test.tolist()) == list(range(len(all_labels)))
    train_images, train_labels = digits(16, "train")
    test_images, test_labels = digits(16, "test")
    assert torch.equal(train_images, all_images[train]) and torch.equal(
        train_labels, all_labels[train]
    )
    assert torch.equal(test_images, all_images[test]) and torch.equal(test_labels, all_labels[test])
    assert torch.bincount(test_labels).tolist() == [TEST_PER_CLASS] * NUM_CLASSES


def test_deterministic_and_seeded():
    a_images, a_labels = digits(16, "test")
    b_images, b_labels = digits(16, "test")
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, _ = digits(16, "test", seed=1)
    assert not torch.equal(a_images, c_images)


def test_resize_keeps_the_picture():
    small, _ = digits(8, "all")
    large, _ = digits(16, "all")
    # bilinear ×2 then 2×2 average pooling only blurs: same mean, strongly correlated pixels
    down = torch.nn.functional.avg_pool2d(large, 2)
    assert torch.allclose(down.mean(), small.mean(), atol=0.02)
    correlation = torch.corrcoef(torch.stack([down.flatten(), small.flatten()]))[0, 1]
    assert correlation > 0.95


def test_device_and_bad_arguments():
    images, labels = digits(16, "test", device="meta")
    assert images.device.type == "meta" and labels.device.type == "meta"
    with pytest.raises(ValueError, match="split"):
        digits(16, "validation")
    with pytest.raises(ValueError, match="size"):
        digits(0)


def test_batches_cover_one_epoch():
    images, labels = digits(8, "test")
    generator = torch.Generator().manual_seed(0)
    seen = list(batches(images, labels, batch_size=64, generator=generator))
    assert [len(y) for _, y in seen] == [64, 64, 64, 64, 44]
    assert sorted(torch.cat([y for _, y in seen]).tolist()) == sorted(labels.tolist())
    again = list(batches(images, labels, batch_size=64, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, again, strict=True))
    dropped = list(batches(labels, batch_size=64, drop_last=True, shuffle=False))
    assert len(dropped) == 4 and torch.equal(dropped[0][0], labels[:64])
    with pytest.raises(ValueError, match="first dimension"):
        next(batches(images, labels[:-1], batch_size=8))
