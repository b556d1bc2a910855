"""The prune study: its quick run end to end."""

import json

import pytest

from adaptdiff.cli import main
from adaptdiff.studies import get_study
from adaptdiff.studies.prune import PruneConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_prune_quick_runs_every_variant(tmp_path, capsys):
    assert main(["study", "prune", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("prune").quick(PruneConfig())
    rows = result["summary"]
    (k,) = cfg.prune_counts
    variants = [f"-{k} blocks: {v}" for v in ("no recovery", "fine-tune", "distill")]
    assert list(rows) == [f"full ({cfg.depth} blocks)", *variants, "real digits"]
    full = rows[f"full ({cfg.depth} blocks)"]
    assert full["blocks"]["mean"] == cfg.depth and full["speedup"]["mean"] == 1.0
    for name in variants:
        row = rows[name]
        assert row["blocks"]["mean"] == cfg.depth - k
        assert row["params"]["mean"] < full["params"]["mean"]
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0 and row["fd"]["mean"] > 0
        assert (row["recover_s"]["mean"] is None) == (name.endswith("no recovery"))
    importance = json.loads((tmp_path / "seed-0" / "importance.json").read_text())
    assert len(importance["importance"]) == cfg.depth
    assert len(importance["cuts"][str(k)]) == cfg.depth - k
    assert (tmp_path / "prune.png").exists()
    assert "distill" in capsys.readouterr().out
