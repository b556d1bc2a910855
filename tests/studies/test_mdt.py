"""The mdt study: its models, steps-to-FD, its checks and the quick run end to end."""

import dataclasses
import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.models import DiT
from adaptdiff.models.mdt import MDT
from adaptdiff.studies import get_study
from adaptdiff.studies.mdt import MDTStudyConfig, build, run_seed, steps_to_fd
from adaptdiff.studies.runner import Progress

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_the_full_run_compares_models_of_the_same_size():
    cfg = MDTStudyConfig()
    dit, mdt = build("DiT", cfg), build("MDT", cfg)
    assert isinstance(dit, DiT) and not isinstance(dit, MDT) and isinstance(mdt, MDT)
    assert len(dit.blocks) == len(mdt.blocks) + 1  # the side-interpolator is MDT's extra block
    assert abs(_params(dit) / _params(mdt) - 1) < 0.01
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    for model in (dit, mdt):
        assert model.config.time_scale == 1000.0 and model(x, t, y).shape == x.shape


def test_steps_to_fd_is_the_first_checkpoint_at_or_below_the_target():
    steps = (10, 20, 30)
    assert steps_to_fd([90.0, 50.0, 60.0], steps, 55.0) == 20.0
    assert steps_to_fd([90.0, 50.0, 60.0], steps, 50.0) == 20.0
    assert steps_to_fd([90.0, 80.0, 70.0], steps, 60.0) is None


def test_bad_configs_are_refused(tmp_path):
    for bad, match in (
        (dict(checkpoints=(1, 2, 3)), "checkpoints must be 5 increasing"),
        (dict(checkpoints=(1, 2, 2, 3, 4)), "checkpoints must be 5 increasing"),
        (dict(decode_layers=4), r"decode_layers must be in \[1, depth=4\)"),
    ):
        with pytest.raises(ValueError, match=f"mdt study: {match}"):
            run_seed(dataclasses.replace(MDTStudyConfig(), **bad), 0, tmp_path, Progress())
    with pytest.raises(ValueError, match="mdt study: unknown model 'UNet'"):
        build("UNet", MDTStudyConfig())


def test_mdt_quick_runs_both_models(tmp_path, capsys):
    assert main(["study", "mdt", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("mdt").quick(MDTStudyConfig())
    rows = result["summary"]
    assert list(rows) == ["DiT", "MDT", "real digits"]
    finals = [rows[name]["fd_5"]["mean"] for name in ("DiT", "MDT")]
    for name in ("DiT", "MDT"):
        row = {k: v["mean"] for k, v in rows[name].items()}
        assert [row[f"step_{i}"] for i in range(1, 6)] == list(cfg.checkpoints)
        assert all(row[f"fd_{i}"] > 0 for i in range(1, 6))
        assert row["target_fd"] == max(finals)  # the worse final FD: both reach it
        assert row["steps_to_fd"] in cfg.checkpoints and row["s_per_step"] > 0
        assert row["wall_to_fd"] == pytest.approx(row["steps_to_fd"] * row["s_per_step"])
    dit, mdt = rows["DiT"], rows["MDT"]
    assert mdt["speedup"]["mean"] == dit["steps_to_fd"]["mean"] / mdt["steps_to_fd"]["mean"]
    assert "speedup" not in dit
    assert (tmp_path / "mdt.png").exists()
    assert "speed-up" in capsys.readouterr().out
