import pytest
import torch

from adaptdiff.data.photos import photo_patches


def test_patches_are_deterministic_in_range_and_have_fine_detail():
    a = photo_patches(64, 32, seed=3)
    assert a.shape == (64, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, photo_patches(64, 32, seed=3))
    assert not torch.equal(a, photo_patches(64, 32, seed=4))
    assert a.min() >= -1 and a.max() <= 1
    # Real high frequencies: a 2x down-up round trip loses a visible share of the energy,
    # unlike the digits, which are bilinear upsamplings of 8x8 images.
    down_up = torch.nn.functional.interpolate(
        torch.nn.functional.avg_pool2d(a, 2), scale_factor=2, mode="nearest"
    )
    assert (a - down_up).square().mean() > 1e-3


def test_train_and_test_come_from_disjoint_columns():
    train = photo_patches(32, 16, "train", seed=0, scales=(1,))
    test = photo_patches(32, 16, "test", seed=0, scales=(1,))
    assert not torch.equal(train, test)
    assert photo_patches(0, 16).shape == (0, 1, 16, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": -1}, "n must"),
        ({"n": 2, "split": "val"}, "split must"),
        ({"n": 2, "scales": (0,)}, "scales must"),
        ({"n": 2, "size": 200, "split": "test"}, "size 200 does not fit"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"photo_patches: {match}"):
        photo_patches(**kwargs)
