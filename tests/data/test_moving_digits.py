import pytest
import torch

from adaptdiff.data import MOTIONS, moving_digits
from adaptdiff.data.moving_digits import (
    centroid_velocity,
    centroids,
    classify_motion,
    motion_step,
    place,
    render_clips,
    warp,
)


def _square(size=16, side=4):
    img = torch.full((1, 1, size, size), -1.0)
    lo = (size - side) // 2
    img[..., lo : lo + side, lo : lo + side] = 1.0
    return img


def test_shapes_labels_range_and_determinism():
    clips, labels, motions = moving_digits(12, num_frames=8, seed=3)
    assert clips.shape == (12, 8, 1, 16, 16) and clips.dtype == torch.float32
    assert labels.shape == (12,) and motions.shape == (12,)
    assert clips.min() >= -1.0 and clips.max() <= 1.0 + 1e-6
    assert set(motions.tolist()) <= set(range(len(MOTIONS)))
    again = moving_digits(12, num_frames=8, seed=3)
    assert torch.equal(clips, again[0]) and torch.equal(labels, again[1])
    only = moving_digits(6, classes=(7,), motions=("up",), seed=0)
    assert only[1].tolist() == [7] * 6 and only[2].tolist() == [0] * 6


def test_warp_moves_by_whole_pixels_exactly():
    img = _square()
    moved = warp(img, 2.0, -1.0, 0.0)
    assert torch.allclose(moved[..., 5:9, 8:12], torch.ones(1, 1, 4, 4), atol=1e-5)
    assert torch.allclose(moved.sum(), img.sum(), atol=1e-3)  # the square stays inside
    back = warp(moved, -2.0, 1.0, 0.0)
    assert torch.allclose(back, img, atol=1e-5)
    # a quarter turn of a square about the centre is the square again
    assert torch.allclose(warp(img, 0.0, 0.0, 90.0), img, atol=1e-4)


def test_translation_centroids_move_by_the_step_and_rotations_stay():
    clips, _, motions = moving_digits(60, seed=1)
    velocity = centroid_velocity(clips)
    for i, m in enumerate(motions.tolist()):
        dx, dy, _ = motion_step(MOTIONS[m])
        tol = 1e-3 if MOTIONS[m] in ("right", "left", "up", "down") else 0.3
        assert torch.allclose(velocity[i], torch.tensor([dx, dy]), atol=tol), MOTIONS[m]
    c = centroids(clips)
    assert c.shape == (60, 8, 2)


def test_classify_motion_reads_every_rendered_motion_and_a_still_clip():
    clips, _, motions = moving_digits(48, seed=2)
    assert classify_motion(clips) == [MOTIONS[m] for m in motions.tolist()]
    still = place(torch.ones(1, 1, 6, 6), 16)[:, None].expand(1, 8, 1, 16, 16)
    assert classify_motion(still) == ["static"]


def test_clockwise_is_clockwise_on_screen():
    img = torch.full((1, 1, 16, 16), -1.0)
    img[..., 2:4, 7:9] = 1.0  # a dot above the centre (y down)
    clip = render_clips(img, ["cw"], num_frames=2, angle=45.0)
    # frame 1 is 45 degrees further clockwise than frame 0: the dot moves right
    c = centroids(clip)[0]
    assert c[1, 0] > c[0, 0] + 1.0


def test_bad_arguments_name_the_function():
    with pytest.raises(ValueError, match="motion_step: motion must be one of"):
        motion_step("sideways")
    with pytest.raises(ValueError, match="moving_digits: motions must be"):
        moving_digits(2, motions=("sideways",))
    with pytest.raises(ValueError, match="moving_digits: digit_size"):
        moving_digits(2, digit_size=20)
    with pytest.raises(ValueError, match="render_clips: 1 images but 2 motions"):
        render_clips(_square(), ["up", "up"])
    with pytest.raises(ValueError, match="classify_motion: clips must be"):
        classify_motion(torch.zeros(1, 1, 1, 16, 16))
