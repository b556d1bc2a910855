"""The time-series study: its pieces (training, sampling, scoring, baselines) and the quick run."""

import json

import numpy as np
import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data import timeseries as ts
from adaptdiff.studies.timeseries import (
    ROWS,
    TimeSeriesStudyConfig,
    baselines,
    build_model,
    errors,
    predict,
    train_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_training_lowers_the_loss_and_sampling_gives_series():
    cfg = TimeSeriesStudyConfig(dim=16, depth=1, train_steps=40, batch=16, lr=3e-3)
    series = ts.synthetic_series(64, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = train_model(model, series, cfg, seed=0)
    assert not model.training
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:5])
    batch = ts.task_batch(series[:3], "imputation", seed=0)
    draws = predict(model, batch, steps=2, samples=2, g=torch.Generator().manual_seed(0))
    assert draws.shape == (2, 3, 6, 64) and np.isfinite(draws).all()
    assert not np.allclose(draws[0], draws[1])  # two draws from different noise


def test_errors_score_only_the_scored_values():
    s = ts.synthetic_series(2, num_vars=2, length=32, seed=0)
    batch = ts.task_batch(s, "forecasting", seed=0, horizon=8)
    pred = s.copy()
    pred[..., :-8] += 100.0  # the observed history is not scored
    pred[..., -8:] += 2.0
    assert errors(pred, batch) == pytest.approx((4.0, 2.0))


def test_baselines_cover_their_tasks():
    cfg = TimeSeriesStudyConfig(length=32, horizon=8, period=8, ar_order=4)
    s = ts.synthetic_series(4, num_vars=3, length=32, period=8, seed=0)
    coef = ts.fit_ar(s.reshape(-1, 32), 4)
    rows = {}
    for task in ts.TASKS:
        batch = ts.task_batch(s, task, seed=0, horizon=8)
        preds = baselines(batch, task, cfg, coef)
        assert all(p.shape == s.shape for p in preds.values())
        rows.update(preds)
        if task == "forecasting":  # the history is kept as observed
            for p in preds.values():
                np.testing.assert_array_equal(p[..., :-8], s[..., :-8])
    assert set(rows) == set(ROWS) - {"UniTS", "UniTS (1 sample)"}


def test_timeseries_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "timeseries", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["summary"]
    assert list(rows) == list(ROWS)
    for task in ("rec", "imp", "fc"):
        assert rows["UniTS"][f"{task}_mse"]["mean"] > 0
    assert "fc_mse" in rows["AR(p)"] and "rec_mse" not in rows["AR(p)"]
    assert (tmp_path / "timeseries.png").exists()
    assert "linear interpolation" in capsys.readouterr().out
