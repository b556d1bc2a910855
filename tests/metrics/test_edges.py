"""Edge-detection scores: thinning, NMS, greedy tolerance matching, ODS / OIS and AC on
hand-made cases."""

import numpy as np
import pytest

from adaptdiff.metrics.edges import average_crispness, edge_nms, edge_scores, match, sobel, thin

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _square(n=2, size=16, lo=4, hi=11):
    gt = np.zeros((n, 1, size, size), dtype=np.float32)
    gt[:, 0, lo, lo : hi + 1] = gt[:, 0, hi, lo : hi + 1] = 1
    gt[:, 0, lo : hi + 1, lo] = gt[:, 0, lo : hi + 1, hi] = 1
    return gt


def test_perfect_prediction_scores_one():
    gt = _square()
    s = edge_scores(gt[:, 0], gt, radius=1.0, thresholds=5)
    assert s["ods"] == pytest.approx(1.0) and s["ois"] == pytest.approx(1.0)
    assert s["ac"] == pytest.approx(1.0)


def test_a_one_pixel_shift_is_forgiven_within_the_tolerance_only():
    gt = np.zeros((1, 1, 16, 16), dtype=np.float32)
    gt[0, 0, 8, 2:14] = 1
    shifted = np.roll(gt[:, 0], 1, axis=-2)
    assert edge_scores(shifted, gt, radius=1.0)["ods"] == pytest.approx(1.0)
    assert edge_scores(shifted, gt, radius=0.0)["ods"] == 0.0
    two = np.roll(gt[:, 0], 2, axis=-2)
    assert edge_scores(two, gt, radius=1.0)["ods"] == 0.0
    assert edge_scores(two, gt, radius=2.0)["ods"] == pytest.approx(1.0)


def test_empty_prediction_and_half_recall():
    gt = _square(n=1)
    empty = edge_scores(np.zeros((1, 16, 16)), gt)
    assert empty["ods"] == 0.0 and empty["ois"] == 0.0
    assert np.isnan(empty["ac"])
    half = gt[:, 0].copy()
    half[:, :8] = 0  # keeps the lower half of the square's boundary
    s = edge_scores(half, gt, radius=0.0, thresholds=3)
    kept, total = half.sum(), gt.sum()
    r = kept / total
    assert s["ods_precision"] == pytest.approx(1.0)
    assert s["ods_recall"] == pytest.approx(r)
    assert s["ods"] == pytest.approx(2 * r / (1 + r))


def test_recall_counts_every_annotator_and_precision_any():
    line = np.zeros((1, 16, 16), dtype=np.float32)
    line[0, 8, 2:14] = 1
    other = np.zeros_like(line)
    other[0, 2, 2:14] = 1  # a second annotator draws a different edge
    ann = np.stack([line, other], 1)
    s = edge_scores(line, ann, radius=1.0, thresholds=3)
    assert s["ods_precision"] == pytest.approx(1.0)
    assert s["ods_recall"] == pytest.approx(0.5)


def test_match_is_one_to_one_and_within_the_radius():
    pred = np.zeros((1, 8, 8), bool)
    gt = np.zeros((1, 8, 8), bool)
    pred[0, 4, 3] = pred[0, 4, 4] = True  # two predictions ...
    gt[0, 4, 4] = True  # ... one annotated pixel
    mp, mg = match(pred, gt, radius=1.0)
    assert mp.sum() == 1 and mp[0, 4, 4] and mg.sum() == 1  # the exact hit wins
    far = np.zeros_like(gt)
    far[0, 6, 6] = True
    mp, mg = match(pred, far, radius=1.5)
    assert mp.sum() == 0 and mg.sum() == 0
    with pytest.raises(ValueError, match="radius"):
        match(pred, gt, radius=-1)


def test_thin_keeps_lines_and_thins_bands():
    line = np.zeros((12, 12), bool)
    line[6, 2:10] = True
    np.testing.assert_array_equal(thin(line), line)
    band = np.zeros((12, 12), bool)
    band[4:7, 1:11] = True  # 3 px thick
    t = thin(band)
    assert t.sum() < band.sum() / 2 and t.any()
    assert (t.sum(0)[2:9] == 1).all()  # one pixel per column inside the band


def test_nms_and_crispness_favour_thin_maps():
    thick = np.zeros((1, 16, 16))
    for k, v in enumerate((0.3, 0.6, 1.0, 0.6, 0.3)):
        thick[0, 6 + k, 2:14] = v
    kept = edge_nms(thick)
    assert (kept[0, 8, 3:13] == 1.0).all() and kept[0, 6:8].sum() == 0
    thin_map = np.zeros_like(thick)
    thin_map[0, 8, 2:14] = 1.0
    assert average_crispness(thin_map) == pytest.approx(1.0)
    assert average_crispness(thick) < 0.5


def test_sobel_is_normalised_and_fires_on_a_step():
    img = np.zeros((1, 1, 10, 10))
    img[..., 5:] = 1.0
    s = sobel(img)
    assert s.shape == (1, 10, 10) and s.max() == pytest.approx(1.0)
    assert (s[0, :, 4:6] == 1.0).all() and s[0, :, :3].max() == 0.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="edge_scores"):
        edge_scores(np.zeros((2, 8, 8)), np.zeros((3, 1, 8, 8)))
