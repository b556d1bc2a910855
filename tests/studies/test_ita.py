"""The ita study: its hole metrics, its ITAFA weight-shift measure, and the quick run."""

import json
import math

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.studies import get_study
from adaptdiff.studies.ita import VARIANTS, ItaConfig, hole_errors, make_model, weight_shift

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_hole_errors_read_only_the_hidden_pixels():
    target = torch.zeros(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., 2:] = 1
    out = target.clone()
    out[..., :2] = 5.0  # errors in the kept region do not count
    assert hole_errors(out, target, mask)["mse"] == 0.0
    out[0, ..., 2:] = 1.0  # sample 0: hole MSE 1; sample 1: exact
    errs = hole_errors(out, target, mask)
    assert errs["mse"] == pytest.approx(0.5)
    # per sample: 10 log10(4 / 1) and 10 log10(4 / 1e-10) (the floor), averaged
    assert errs["psnr"] == pytest.approx((10 * math.log10(4.0) + 10 * math.log10(4e10)) / 2)


def test_weight_shift_is_zero_when_the_mix_ignores_the_timestep():
    cfg = get_study("ita").quick(ItaConfig())
    model = make_model(cfg, "itafa")
    refs = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        model.itafa.alpha.fill_(0.0)  # the complexity branch only
    assert weight_shift(model, refs) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.itafa.alpha.fill_(1.0)
        model.itafa.time_proj.weight.normal_(std=2.0)
    assert 0.0 < weight_shift(model, refs) <= 1.0


def test_ita_quick(tmp_path):
    assert main(["study", "ita", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert list(rows) == list(VARIANTS)
    for name, row in rows.items():
        assert row["mse"]["mean"] >= 0 and 0.0 <= row["agree"]["mean"] <= 1.0
        assert row["fd"]["mean"] >= 0
        assert (row["dw"]["mean"] is None) == (not name.startswith("ITAFA"))
    assert (tmp_path / "ita.png").exists() and (tmp_path / "seed-0" / "samples.png").exists()
