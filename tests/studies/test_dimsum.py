"""The dimsum study: its models, its checks and the quick run end to end."""

import dataclasses
import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.models import DiT
from adaptdiff.models.dimsum import DiMSUM
from adaptdiff.studies import get_study
from adaptdiff.studies.dimsum import DimsumConfig, build, run_seed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_the_full_run_compares_models_of_about_the_same_size():
    cfg = DimsumConfig()
    dit, dimsum, dim = (build(name, cfg) for name in ("dit", "dimsum", "dim"))
    assert isinstance(dit, DiT) and isinstance(dimsum, DiMSUM) and isinstance(dim, DiMSUM)
    assert dimsum.config.wavelet and not dim.config.wavelet
    assert abs(_params(dit) / _params(dimsum) - 1) < 0.1  # matched to 10 %
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 2])
    for model in (dit, dimsum):  # flow time scaled the same way, same output shape
        assert model.config.time_scale == 1000.0 and model(x, t, y).shape == x.shape


def test_bad_configs_are_refused(tmp_path):
    from adaptdiff.studies.runner import Progress

    for bad, match in (
        (dict(models=("dit", "unet")), "models must be some of"),
        (dict(models=()), "models must be some of"),
        (dict(mid_step=160, steps=160), r"mid_step must be in \(0, steps=160\)"),
    ):
        with pytest.raises(ValueError, match=f"dimsum study: {match}"):
            run_seed(dataclasses.replace(DimsumConfig(), **bad), 0, tmp_path, Progress())


def test_dimsum_quick_runs_both_models(tmp_path, capsys):
    assert main(["study", "dimsum", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    cfg = get_study("dimsum").quick(DimsumConfig())
    rows = result["summary"]
    assert list(rows) == ["DiT", "DiMSUM", "real digits"]
    for name in ("DiT", "DiMSUM"):
        row = rows[name]
        assert row["steps"]["mean"] == cfg.steps and row["mid_step"]["mean"] == cfg.mid_step
        for key in ("accuracy", "accuracy_mid"):
            assert 0.0 <= row[key]["mean"] <= 1.0
        assert row["fd"]["mean"] > 0 and row["sample_s"]["mean"] > 0
    assert rows["DiMSUM"]["params"]["mean"] != rows["DiT"]["params"]["mean"]
    assert (tmp_path / "dimsum.png").exists()
    assert "DiMSUM" in capsys.readouterr().out
