"""Synthetic time series, cloud masks, task batches and the baselines (hand cases)."""

import numpy as np
import pytest

from adaptdiff.data import timeseries as ts


def test_series_are_deterministic_shaped_and_seasonal():
    a = ts.synthetic_series(4, num_vars=3, length=64, period=16, seed=7)
    b = ts.synthetic_series(4, num_vars=3, length=64, period=16, seed=7)
    c = ts.synthetic_series(4, num_vars=3, length=64, period=16, seed=8)
    assert a.shape == (4, 3, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # without noise and regime switches, detrended values repeat with the 4-period component
    # only: a one-period lag explains most of the variance
    x = ts.synthetic_series(200, num_vars=2, length=64, period=16, noise=0.0, switches=0, seed=0)
    d = x[..., 16:] - x[..., :-16]
    assert d.var() < 0.5 * x.var()


def test_cloud_mask_has_blocks_within_coverage():
    m = ts.cloud_mask(50, 6, 64, coverage=(0.2, 0.4), seed=0)
    assert set(np.unique(m)) <= {0.0, 1.0}
    missing = 1 - m.mean(axis=(1, 2))
    assert (missing >= 0.2).all() and (missing < 0.4 + 16 * 6 / (6 * 64)).all()
    # missing values come in runs: far fewer 1->0 switches along time than missing values
    switches = (np.diff(m, axis=-1) < 0).sum()
    assert switches < 0.2 * (m == 0).sum()


def test_task_batches():
    s = ts.synthetic_series(9, num_vars=4, length=32, seed=0)
    b = ts.task_batch(s, np.array([0, 1, 2] * 3), seed=1, noise=0.5, horizon=8)
    np.testing.assert_array_equal(b["target"], s)
    rec, imp, fc = b["task"] == 0, b["task"] == 1, b["task"] == 2
    assert (b["mask"][rec] == 1).all()
    assert 0.1 < np.std(b["observed"][rec] - s[rec]) < 1.0  # noisy, every value observed
    assert (b["mask"][fc][..., -8:] == 0).all() and (b["mask"][fc][..., :-8] == 1).all()
    assert (b["mask"][imp] == 0).any()
    for part in (imp, fc):
        np.testing.assert_array_equal(b["observed"][part], s[part] * b["mask"][part])
    w = ts.scored(b)
    assert (w[rec] == 1).all() and (w[fc][..., -8:] == 1).all() and (w[fc][..., :-8] == 0).all()
    with pytest.raises(ValueError, match="task_batch: task must be one of"):
        ts.task_batch(s, "cloud", seed=0)
    with pytest.raises(ValueError, match="task_batch: horizon"):
        ts.task_batch(s, "forecasting", horizon=32)
    with pytest.raises(ValueError, match="synthetic_series: n"):
        ts.synthetic_series(0)


def test_linear_interpolation_hand_case():
    obs = np.array([[[1.0, 0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]])
    mask = np.array([[[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]], dtype=np.float32)
    out = ts.linear_interpolation(obs, mask)
    np.testing.assert_allclose(out[0, 0], [1, 2, 3, 4, 4])  # held after the last value
    np.testing.assert_allclose(out[0, 1], [2.5] * 5)  # no value: the series' observed mean


def test_moving_average_hand_case():
    np.testing.assert_allclose(
        ts.moving_average(np.array([1.0, 2, 3, 4, 5]), 3), [1.5, 2, 3, 4, 4.5]
    )
    with pytest.raises(ValueError, match="moving_average: window"):
        ts.moving_average(np.zeros(4), 2)


def test_seasonal_naive_hand_case():
    hist = np.array([9.0, 1, 2, 3])
    np.testing.assert_allclose(ts.seasonal_naive(hist, 5, 3), [1, 2, 3, 1, 2])
    with pytest.raises(ValueError, match="seasonal_naive: history"):
        ts.seasonal_naive(hist, 2, 5)


def test_ar_recovers_a_known_process_and_forecasts_it():
    x = np.zeros((3, 40))
    x[:, 0] = [1.0, -2.0, 5.0]
    x[:, 1] = [0.5, 1.0, -1.0]
    for t in range(2, 40):  # x_t = 0.5 x_{t-1} - 0.3 x_{t-2} + 1
        x[:, t] = 0.5 * x[:, t - 1] - 0.3 * x[:, t - 2] + 1.0
    coef = ts.fit_ar(x, 2)
    np.testing.assert_allclose(coef, [0.5, -0.3, 1.0], atol=1e-8)
    np.testing.assert_allclose(ts.ar_forecast(x[:, :30], coef, 10), x[:, 30:], atol=1e-5)
    with pytest.raises(ValueError, match="fit_ar: rows"):
        ts.fit_ar(x[:, :2], 2)
