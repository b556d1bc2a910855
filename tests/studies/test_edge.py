"""The edge study: its scoring helper and the quick run end to end."""

import json

import numpy as np
import pytest

from adaptdiff.cli import main
from adaptdiff.data.edge_scenes import edge_scenes
from adaptdiff.studies.edge import DIFFUSION, DISCRIMINATIVE, SOBEL, EdgeStudyConfig, _scores

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_scores_of_the_truth_beat_sobel():
    d = edge_scenes(8, seed=0)
    cfg = EdgeStudyConfig(thresholds=5)
    truth = _scores(d["boundary"][:, 0].numpy(), d["annotators"], cfg)
    assert set(truth) == {"ods", "ois", "seval_ods", "seval_ois", "ac"}
    from adaptdiff.metrics.edges import sobel

    s = _scores(sobel(d["images"]), d["annotators"], cfg)
    assert truth["ods"] > s["ods"] and truth["ac"] > s["ac"]


def test_edge_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "edge", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["summary"]
    assert list(rows) == [DIFFUSION, DISCRIMINATIVE, SOBEL]
    for row in rows.values():
        assert 0.0 <= row["ods"]["mean"] <= 1.0 and np.isfinite(row["ac"]["mean"])
    assert (tmp_path / "edge.png").exists()
    assert list(tmp_path.glob("**/examples.png"))
    assert "Sobel" in capsys.readouterr().out
