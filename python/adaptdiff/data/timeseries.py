"""Synthetic multivariate time series in numpy, cloud-like missing blocks, and the batches of
three tasks a time-series generative model is asked to solve: reconstruction, imputation and
forecasting.

:func:`synthetic_series` draws ``n`` series of ``num_vars`` variables over ``length`` steps.
Each series is its own "site": its variables are random mixtures of three seasonal components
shared by the series (periods ``period``, ``period / 2`` and ``4 period``, random phases),
plus a linear trend and regime switches (level jumps at random times, each variable moving by
its own loading), plus white noise. The mixing weights differ per series, so a model has to
read the relations between the variables from the observed values: a variable's missing stretch
can be inferred from the other variables of the same series.

:func:`cloud_mask` draws observation masks with missing *blocks* (contiguous in time and over a
range of adjacent variables, like a cloud over neighbouring bands of a satellite series) until
a drawn share of the values is missing.

:func:`task_batch` turns clean series into a task: ``observed`` values and an observation
``mask`` (1 = observed) are the condition, the clean series is the ``target``, and
:func:`scored` says where a prediction is scored:

- ``reconstruction``: every value observed with additive Gaussian noise; scored everywhere;
- ``imputation``: the clean values outside cloud blocks; scored in the blocks;
- ``forecasting``: the clean values before the last ``horizon`` steps; scored on those steps.

Everything random comes from ``numpy.random.default_rng(seed)``: a seed gives the same data.

Simple baselines, pure functions of arrays: :func:`linear_interpolation` (imputation),
:func:`moving_average` (reconstruction), :func:`seasonal_naive` (forecasting) and a
least-squares autoregression, :func:`fit_ar` / :func:`ar_forecast` (forecasting).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "TASKS",
    "ar_forecast",
    "cloud_mask",
    "fit_ar",
    "linear_interpolation",
    "moving_average",
    "scored",
    "seasonal_naive",
    "synthetic_series",
    "task_batch",
]

TASKS = ("reconstruction", "imputation", "forecasting")


def _check_positive(where: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")


def synthetic_series(
    n: int,
    num_vars: int = 6,
    length: int = 64,
    *,
    period: int = 16,
    noise: float = 0.1,
    switches: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """``[n, num_vars, length]`` float32 series: seasonal mixtures + trend + regime switches +
    noise (see the module docstring); ``switches`` is the largest number of regime switches a
    series has (drawn uniformly in ``0..switches``)."""
    _check_positive("synthetic_series", n=n, num_vars=num_vars, length=length, period=period)
    if noise < 0:
        raise ValueError(f"synthetic_series: noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    phases = rng.uniform(0, 2 * np.pi, (n, 3, 1))
    freqs = 2 * np.pi / np.array([period, period / 2, 4 * period])[None, :, None]
    comps = np.sin(freqs * t + phases)  # [n, 3, T]
    amps = np.array([1.0, 0.5, 0.7])[None, None]
    weights = rng.normal(0, 1, (n, num_vars, 3)) * amps  # [n, V, 3]
    seasonal = np.einsum("nvk,nkt->nvt", weights, comps)
    slope = rng.normal(0, 1.0, (n, 1, 1)) * rng.uniform(0.2, 1.0, (n, num_vars, 1))
    trend = slope * (t / length - 0.5)
    level = np.zeros((n, num_vars, length))
    count = rng.integers(0, switches + 1, n)
    for i in range(n):
        for _ in range(count[i]):
            at = rng.integers(length // 8, length)
            jump = rng.normal(0, 1.0) * rng.uniform(0.3, 1.0, num_vars)
            level[i, :, at:] += jump[:, None]
    offset = rng.normal(0, 0.5, (n, num_vars, 1))
    x = seasonal + trend + level + offset + noise * rng.normal(0, 1, (n, num_vars, length))
    return x.astype(np.float32)


def cloud_mask(
    n: int,
    num_vars: int,
    length: int,
    *,
    coverage: tuple[float, float] = (0.2, 0.6),
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """``[n, num_vars, length]`` float32 observation masks (1 = observed, 0 = missing). Per
    series, a target missing share is drawn uniformly in ``coverage``; blocks (a run of
    ``length/16 .. length/4`` steps over a run of adjacent variables) are added until the share
    is reached (the last block may overshoot it). Every series keeps at least one observed value."""
    _check_positive("cloud_mask", n=n, num_vars=num_vars, length=length)
    lo, hi = coverage
    if not 0 <= lo <= hi < 1:
        raise ValueError(f"cloud_mask: coverage must satisfy 0 <= low <= high < 1, got {coverage}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mask = np.ones((n, num_vars, length), dtype=np.float32)
    shortest, longest = max(1, length // 16), max(1, length // 4)
    for i in range(n):
        goal = rng.uniform(lo, hi)
        while 1 - mask[i].mean() < goal:
            run = rng.integers(shortest, longest + 1)
            start = rng.integers(0, length - run + 1)
            nv = rng.integers(1, num_vars + 1)
            v0 = rng.integers(0, num_vars - nv + 1)
            mask[i, v0 : v0 + nv, start : start + run] = 0
        if not mask[i].any():  # pragma: no cover - coverage < 1 keeps a value in practice
            mask[i, 0, 0] = 1
    return mask


def task_batch(
    series: np.ndarray,
    task: str | Sequence[int] | np.ndarray,
    *,
    seed: int | np.random.Generator = 0,
    noise: float = 0.5,
    horizon: int = 16,
    coverage: tuple[float, float] = (0.2, 0.6),
) -> dict[str, np.ndarray]:
    """One task per series of ``series [n, V, T]``: ``task`` is a name of :data:`TASKS` for the
    whole batch or ``[n]`` indices into it. Returns float32 ``target`` (the clean series),
    ``observed`` (the condition values, 0 where missing), ``mask`` (1 = observed) and int64
    ``task [n]``. ``noise`` is the reconstruction noise's standard deviation, ``horizon`` the
    forecast length, ``coverage`` the imputation's missing share range."""
    series = np.asarray(series, dtype=np.float32)
    if series.ndim != 3:
        raise ValueError(f"task_batch: series must be [n, V, T], got shape {series.shape}")
    n, V, T = series.shape
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"task_batch: task must be one of {TASKS}, got {task!r}")
        ids = np.full(n, TASKS.index(task), dtype=np.int64)
    else:
        ids = np.asarray(task, dtype=np.int64)
        if ids.shape != (n,) or (ids < 0).any() or (ids >= len(TASKS)).any():
            raise ValueError(
                f"task_batch: task must be a name or [{n}] indices in 0..{len(TASKS) - 1}"
            )
    if not 1 <= horizon < T:
        raise ValueError(f"task_batch: horizon must be in [1, {T - 1}], got {horizon!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mask = np.ones_like(series)
    if (ids == 1).any():
        mask[ids == 1] = cloud_mask(int((ids == 1).sum()), V, T, coverage=coverage, seed=rng)
    mask[ids == 2, :, T - horizon :] = 0
    observed = series * mask
    rec = ids == 0
    observed[rec] = series[rec] + noise * rng.normal(0, 1, series[rec].shape).astype(np.float32)
    return {"target": series.copy(), "observed": observed, "mask": mask, "task": ids}


def scored(batch: dict[str, np.ndarray]) -> np.ndarray:
    """``[n, V, T]`` float32, 1 where a prediction of ``batch`` (from :func:`task_batch`) is
    scored: everywhere for reconstruction, where the mask is 0 otherwise."""
    rec = (batch["task"] == 0)[:, None, None]
    return np.where(rec, 1.0, 1.0 - batch["mask"]).astype(np.float32)


def linear_interpolation(observed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fills the missing values of every row (the last axis is time) by linear interpolation
    between the nearest observed values, held constant beyond the first and last; a row with no
    observed value gets the mean of the observed values of its series (axis 0), else 0."""
    observed, mask = np.asarray(observed, np.float32), np.asarray(mask, np.float32)
    if observed.shape != mask.shape or observed.ndim < 2:
        raise ValueError(
            f"linear_interpolation: observed and mask must have one shape [n, ..., T], got "
            f"{observed.shape} and {mask.shape}"
        )
    out = observed.copy()
    T = observed.shape[-1]
    grid = np.arange(T)
    flat_x, flat_m = out.reshape(observed.shape[0], -1, T), mask.reshape(observed.shape[0], -1, T)
    for i in range(flat_x.shape[0]):
        seen = flat_m[i] > 0
        fill = float(flat_x[i][seen].mean()) if seen.any() else 0.0
        for r in range(flat_x.shape[1]):
            at = np.flatnonzero(seen[r])
            if at.size == 0:
                flat_x[i, r] = fill
            else:
                flat_x[i, r] = np.interp(grid, at, flat_x[i, r, at])
    return flat_x.reshape(observed.shape)


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over the last axis with an odd ``window``; near the ends, the
    mean of the values the window covers."""
    if not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ValueError(f"moving_average: window must be an odd int >= 1, got {window!r}")
    x = np.asarray(x, np.float64)
    half = window // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    ones = np.pad(np.ones(x.shape[-1]), (half, half))
    sums = np.cumsum(np.pad(x, pad), axis=-1)
    sums = np.concatenate([np.zeros(x.shape[:-1] + (1,)), sums], axis=-1)
    counts = np.concatenate([[0.0], np.cumsum(ones)])
    T = x.shape[-1]
    total = sums[..., window : window + T] - sums[..., :T]
    count = counts[window : window + T] - counts[:T]
    return (total / count).astype(np.float32)


def seasonal_naive(history: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """Forecasts ``horizon`` steps after ``history [..., T0]`` by repeating its last ``period``
    steps: ``forecast[h] = history[T0 - period + h mod period]``."""
    history = np.asarray(history, np.float32)
    _check_positive("seasonal_naive", horizon=horizon, period=period)
    if history.shape[-1] < period:
        raise ValueError(
            f"seasonal_naive: history has {history.shape[-1]} steps, fewer than period {period}"
        )
    last = history[..., history.shape[-1] - period :]
    return last[..., np.arange(horizon) % period]


def fit_ar(rows: np.ndarray, p: int) -> np.ndarray:
    """Least-squares AR(p) with an intercept, pooled over the rows of ``rows [m, T]``:
    ``x_t ~ c_1 x_{t-1} + ... + c_p x_{t-p} + c_0``; returns ``[c_1, ..., c_p, c_0]``."""
    rows = np.asarray(rows, np.float64)
    _check_positive("fit_ar", p=p)
    if rows.ndim != 2 or rows.shape[1] <= p:
        raise ValueError(f"fit_ar: rows must be [m, T] with T > p = {p}, got shape {rows.shape}")
    T = rows.shape[1]
    lags = [rows[:, p - k : T - k] for k in range(1, p + 1)]  # x_{t-k} for t = p..T-1
    X = np.stack(lags + [np.ones_like(lags[0])], -1).reshape(-1, p + 1)
    y = rows[:, p:].reshape(-1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return coef


def ar_forecast(history: np.ndarray, coef: np.ndarray, horizon: int) -> np.ndarray:
    """Iterates the AR model ``coef`` (from :func:`fit_ar`) ``horizon`` steps after
    ``history [..., T0]``, feeding each forecast back in."""
    coef = np.asarray(coef, np.float64)
    p = coef.shape[0] - 1
    _check_positive("ar_forecast", horizon=horizon)
    history = np.asarray(history, np.float64)
    if p < 1 or history.shape[-1] < p:
        raise ValueError(
            f"ar_forecast: history needs at least p = {p} steps, got {history.shape[-1]}"
        )
    window = list(np.moveaxis(history[..., history.shape[-1] - p :], -1, 0))
    out = []
    for _ in range(horizon):
        nxt = coef[-1] + sum(coef[k] * window[-1 - k] for k in range(p))
        out.append(nxt)
        window.append(nxt)
    return np.stack(out, -1).astype(np.float32)
