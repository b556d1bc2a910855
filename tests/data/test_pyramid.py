"""Laplacian pyramid: stage shapes, the definition, exact reconstruction, previews, errors."""

import pytest
import torch
import torch.nn.functional as F

from adaptdiff.data.pyramid import down, laplacian_pyramid, reconstruct, up

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_stages_follow_the_definition_and_reconstruct_exactly():
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    stages = laplacian_pyramid(x)
    assert [tuple(s.shape) for s in stages] == [(3, 2, 8, 8), (3, 2, 16, 16), (3, 2, 32, 32)]
    # X_1 = down(X); X_s = down_s(X) - up(down_{s-1}(X)), with area down and bilinear up
    d8, d16 = F.avg_pool2d(x, 4), F.avg_pool2d(x, 2)
    bilinear = dict(mode="bilinear", align_corners=False)
    torch.testing.assert_close(stages[0], d8)
    torch.testing.assert_close(stages[1], d16 - F.interpolate(d8, size=16, **bilinear))
    torch.testing.assert_close(stages[2], x - F.interpolate(d16, size=32, **bilinear))
    torch.testing.assert_close(reconstruct(stages), x, atol=1e-6, rtol=0)
    # previews: the image at each stage's resolution
    torch.testing.assert_close(reconstruct(stages, upto=1), d8)
    torch.testing.assert_close(reconstruct(stages, upto=2), d16, atol=1e-6, rtol=0)


def test_double_precision_round_trip_is_exact_to_round_off():
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    assert (reconstruct(laplacian_pyramid(x)) - x).abs().max() < 1e-13


@pytest.mark.parametrize("size, sizes", [(15, (4, 7, 15)), (33, (5, 33)), (9, (9,))])
def test_odd_sizes_round_trip(size, sizes):
    x = torch.randn(2, 3, size, size)
    stages = laplacian_pyramid(x, sizes)
    assert [s.shape[-1] for s in stages] == list(sizes)
    torch.testing.assert_close(reconstruct(stages), x, atol=1e-5, rtol=0)


def test_a_constant_image_has_empty_fine_bands():
    x = torch.full((1, 1, 32, 32), 0.3)
    stages = laplacian_pyramid(x)
    torch.testing.assert_close(stages[0], torch.full((1, 1, 8, 8), 0.3))
    assert all(s.abs().max() < 1e-6 for s in stages[1:])


def test_down_and_up_are_the_identity_at_the_same_size():
    x = torch.randn(1, 1, 8, 8)
    assert down(x, 8) is x and up(x, 8) is x


@pytest.mark.parametrize(
    "x, sizes, match",
    [
        (torch.randn(1, 32, 32), (8, 32), "x must be \\[N, C, H, H\\]"),
        (torch.randn(1, 1, 32, 16), (8, 32), "x must be \\[N, C, H, H\\]"),
        (torch.zeros(1, 1, 32, 32, dtype=torch.long), (8, 32), "x must be floating point"),
        (torch.randn(1, 1, 32, 32), (8, 16), "the last size must be the image's \\(32\\)"),
        (torch.randn(1, 1, 32, 32), (16, 8, 32), "sizes must be strictly ascending"),
        (torch.randn(1, 1, 32, 32), (), "sizes must be positive ints"),
        (torch.randn(1, 1, 32, 32), (0, 32), "sizes must be positive ints"),
        (torch.randn(1, 1, 32, 32), (8.0, 32), "sizes must be positive ints"),
    ],
)
def test_laplacian_pyramid_refuses_bad_input(x, sizes, match):
    with pytest.raises(ValueError, match="laplacian_pyramid: " + match):
        laplacian_pyramid(x, sizes)


def test_reconstruct_refuses_bad_stages():
    stages = laplacian_pyramid(torch.randn(2, 1, 16, 16), (4, 8, 16))
    with pytest.raises(ValueError, match="reconstruct: stages is empty"):
        reconstruct([])
    for upto in (0, 4, 1.5):
        with pytest.raises(ValueError, match="reconstruct: upto must be in \\[1, 3\\]"):
            reconstruct(stages, upto=upto)
    with pytest.raises(ValueError, match="reconstruct: stage 2 must be"):
        reconstruct([stages[0], stages[1][:1]])
    with pytest.raises(ValueError, match="reconstruct: stage sizes must be strictly ascending"):
        reconstruct([stages[1], stages[0]])
