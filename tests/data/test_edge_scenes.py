"""Synthetic edge scenes: shapes, determinism, boundaries and the simulated annotators."""

import numpy as np
import pytest
import torch

from adaptdiff.data.edge_scenes import boundaries, edge_scenes

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_scenes_are_deterministic_and_shaped():
    a = edge_scenes(6, seed=3)
    b = edge_scenes(6, seed=3)
    c = edge_scenes(6, seed=4)
    assert a["images"].shape == a["boundary"].shape == a["label"].shape == (6, 1, 32, 32)
    assert a["annotators"].shape == (6, 3, 32, 32)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["images"], c["images"])
    assert a["images"].abs().max() <= 1.0


def test_labels_average_three_annotators_near_the_truth():
    d = edge_scenes(20, seed=0)
    values = set(np.round(d["label"].unique().numpy() * 3).astype(int).tolist())
    assert values <= {0, 1, 2, 3} and {0, 3} <= values
    torch.testing.assert_close(d["label"], d["annotators"].mean(1, keepdim=True))
    truth = d["boundary"].bool()
    ann = d["annotators"].bool()
    assert not torch.equal(ann[:, :1], truth)  # annotators differ from the truth ...
    # ... but stay within a couple of pixels of it: dilate the truth by 2 px
    near = torch.nn.functional.max_pool2d(truth.float(), 5, 1, 2).bool()
    assert (ann & ~near).float().sum() / ann.float().sum() < 0.05
    assert ann.float().mean() < truth.float().mean()  # some segments are dropped


def test_boundaries_of_a_region_map():
    regions = np.zeros((6, 6), dtype=np.int64)
    regions[2:4, 2:4] = 1
    b = boundaries(regions)
    assert b.sum() > 0 and b[0, 0] == 0 and b.dtype == np.float32
    assert b[1, 2] == 1 and b[3, 3] == 1  # above the square, and its own lower-right pixel


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="edge_scenes: n"):
        edge_scenes(-1)
    with pytest.raises(ValueError, match="edge_scenes: size"):
        edge_scenes(2, size=4)
