"""The online caches on adaptdiff's DiT: exactness when nothing is skipped, the skip rules."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from adaptdiff.accel.caching.online import resample

from .support import run, tiny_dit

STEPS = 8


def _with(model, cfg, **kw):
    handle = accel.apply(model, cfg)
    try:
        out = run(model, [handle], steps=STEPS, **kw)
        return out, accel.summary(model)["default"]
    finally:
        accel.remove(model)


@pytest.mark.parametrize(
    "cfg",
    [
        FirstBlockCacheConfig(threshold=0.0),
        FirstBlockCacheConfig(threshold=0.0, first_blocks=2, last_blocks=1),
        TeaCacheConfig(threshold=0.0),
        MagCacheConfig(mag_ratios=[1.0, 0.5, 2.0], threshold=0.0),
        TaylorSeerConfig(interval=1),
    ],
    ids=["fbcache", "dbcache", "teacache", "magcache", "taylorseer"],
)
def test_no_skip_is_bit_identical(cfg):
    model = tiny_dit()
    plain = run(model, steps=STEPS)
    out, s = _with(model, cfg)
    assert torch.equal(out, plain)
    assert s["cached_steps"] == [] and s["hits"] == 0


def test_first_block_cache_skips_and_respects_limits():
    model = tiny_dit()
    plain = run(model, steps=STEPS)
    out, s = _with(model, FirstBlockCacheConfig(threshold=10.0, max_consecutive=2, final_steps=1))
    # warm-up call 0 and call 1 (first comparison) compute; then two skips, a refresh, ...
    assert s["cached_steps"] == [1, 2, 4, 5]
    assert s["block_hit_rates"] == [0.0] + [4 / STEPS] * 3
    assert (out - plain).abs().max() > 0
    _, s = _with(model, FirstBlockCacheConfig(threshold=10.0, max_cached=1))
    assert s["cached_steps"] == [1]


def test_fn_bn_runs_head_and_tail():
    model = tiny_dit(depth=5)
    _, s = _with(model, FirstBlockCacheConfig(threshold=10.0, first_blocks=2, last_blocks=2))
    r = s["block_hit_rates"]
    assert r[0] == r[1] == r[3] == r[4] == 0.0 and r[2] > 0


def test_teacache_accumulates_rescaled_change():
    model = tiny_dit()
    _, loose = _with(model, TeaCacheConfig(threshold=10.0))
    # the last call always computes (the handle tells it how many calls there are)
    assert loose["cached_steps"] == list(range(1, STEPS - 1))
    # a steep polynomial makes every change look large: nothing is skipped
    _, strict = _with(model, TeaCacheConfig(threshold=10.0, coefficients=[1000.0, 100.0]))
    assert strict["cached_steps"] == []
    vals = loose["indicator_percentiles"]
    assert 0 < vals["p10"] <= vals["p50"] <= vals["p90"]


def test_magcache_error_accumulation_and_max_skips():
    model = tiny_dit()
    ones = [1.0] * STEPS
    _, s = _with(model, MagCacheConfig(mag_ratios=ones, max_skip_steps=2, retention_ratio=0.25))
    # retention: calls 0-1 compute; then skip 2, 3, compute 4, skip 5, 6; call 7 is final
    assert s["cached_steps"] == [2, 3, 5, 6]
    drift = [1.0, 1.0, 1.0, 1.05, 1.05, 1.05, 1.05, 1.05]
    _, s = _with(
        model, MagCacheConfig(mag_ratios=drift, threshold=0.06, max_skip_steps=5, retention_ratio=0)
    )
    # errors: call 1: 0, 2: 0, 3: .05, 4: .05+.1025 > .06 -> compute and restart
    assert s["cached_steps"][:3] == [1, 2, 3] and 4 not in s["cached_steps"]
    assert resample([1.0, 2.0, 3.0], 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="mag_ratios is required"):
        MagCacheConfig()


def test_taylorseer_forecast_beats_plain_reuse():
    model = tiny_dit()
    plain = run(model, steps=12)
    errs = {}
    for order in (0, 1):
        handle = accel.apply(model, TaylorSeerConfig(interval=2, order=order, warmup_steps=3))
        out = run(model, [handle], steps=12)
        s = accel.summary(model)["default"]
        accel.remove(model)
        assert s["cached_steps"] == [4, 6, 8, 10]
        errs[order] = float((out - plain).abs().mean())
    assert errs[1] < errs[0]


def test_heun_and_guidance_off_still_work():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig(threshold=0.5))
    out = run(model, [handle], steps=4, method="heun", guidance=1.0)
    assert handle.num_calls == 7 and torch.isfinite(out).all()
