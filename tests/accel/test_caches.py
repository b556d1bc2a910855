"""The online caches on adaptdiff's DiT: exactness when nothing is skipped, the skip rules, what a
skipped step adds (the last computed residual, TaylorSeer's forecast), and their error against
the naive alternatives on the same steps (the blocks as the identity, the last prediction)."""

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

from .support import ReusePrediction, block_share, identity_blocks, real_dit, rel_err, run, tiny_dit

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


class MiddleSpy:
    """Records, per model call, the input of the first middle block and the output of the last
    (``model.blocks[first]`` .. ``model.blocks[last]``), as the model's forward sees them."""

    def __init__(self, model, first, last):
        self.inputs, self.outputs = [], []
        self.handles = [
            model.blocks[first].register_forward_pre_hook(
                lambda m, args: self.inputs.append(args[0].clone())
            ),
            model.blocks[last].register_forward_hook(
                lambda m, args, out: self.outputs.append(out.clone())
            ),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


CACHES = {
    "fbcache": FirstBlockCacheConfig(threshold=10.0, max_consecutive=2),
    "dbcache": FirstBlockCacheConfig(threshold=10.0, max_consecutive=2, first_blocks=2,
                                     last_blocks=1),
    "teacache": TeaCacheConfig(threshold=10.0, max_consecutive=2),
    "magcache": MagCacheConfig(mag_ratios=[1.0] * STEPS, max_skip_steps=2, retention_ratio=0.2),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CACHES))
def test_a_skipped_step_adds_the_last_computed_residual_to_the_middle_input(name):
    cfg = CACHES[name]
    model = real_dit()
    first = getattr(cfg, "first_blocks", 0)
    last = 3 - getattr(cfg, "last_blocks", 0)
    spy = MiddleSpy(model, first, last)
    out, s = _with(model, cfg)
    spy.remove()
    skipped = s["cached_steps"]
    assert len(skipped) >= 4 and len(spy.inputs) == len(spy.outputs) == STEPS
    residual = None
    for call, (x_in, x_out) in enumerate(zip(spy.inputs, spy.outputs, strict=True)):
        if call in skipped:
            # the skipped middle: its input plus the residual of the last computed call, exactly
            assert torch.equal(x_out, x_in + residual), call
        else:
            residual = x_out - x_in
            assert residual.norm() > 0.1 * x_in.norm()  # a residual of consequence
    assert s["block_hit_rates"][first : last + 1] == [len(skipped) / STEPS] * (last + 1 - first)


@pytest.mark.parametrize("name", list(CACHES))
def test_cached_residuals_beat_the_identity_and_reusing_the_prediction(name):
    # The same steps skipped three ways: the cache (its residual), the middle blocks as the
    # identity (a zero residual), the whole last prediction reused.
    cfg = CACHES[name]
    model = real_dit()
    assert block_share(model) > 0.5  # the blocks carry the output: skipping them matters
    plain = run(model, steps=STEPS)
    out, s = _with(model, cfg)
    skipped = s["cached_steps"]
    first, last = getattr(cfg, "first_blocks", 0), getattr(cfg, "last_blocks", 0)
    with identity_blocks(model, range(first, 4 - last), skipped):
        zero = run(model, steps=STEPS)
    reuse = run(model, [ReusePrediction(skipped)], steps=STEPS)
    err, err_zero, err_reuse = rel_err(out, plain), rel_err(zero, plain), rel_err(reuse, plain)
    assert 0 < err < err_zero / 5 and err < err_reuse / 2, (err, err_zero, err_reuse)


def test_first_block_cache_skips_and_respects_limits():
    model = tiny_dit()
    out, s = _with(model, FirstBlockCacheConfig(threshold=10.0, max_consecutive=2, final_steps=1))
    # warm-up call 0 and call 1 (first comparison) compute; then two skips, a refresh, ...
    assert s["cached_steps"] == [1, 2, 4, 5]
    assert s["block_hit_rates"] == [0.0] + [4 / STEPS] * 3
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


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_forecast_is_its_taylor_formula(order):
    # warm-up calls 0-2 compute, then every other call: 3, 5, 7, 9, 11; 4, 6, 8, 10 forecast
    model = real_dit()
    spy = MiddleSpy(model, 0, 3)
    handle = accel.apply(model, TaylorSeerConfig(interval=2, order=order, warmup_steps=3))
    run(model, [handle], steps=12)
    assert accel.summary(model)["default"]["cached_steps"] == [4, 6, 8, 10]
    accel.remove(model)
    spy.remove()
    r = {c: spy.outputs[c] - spy.inputs[c] for c in (1, 2, 3, 5, 7, 9)}
    for c in (4, 6, 8, 10):
        last, prev = c - 1, (c - 3 if c > 4 else 2)  # the two computed calls before c
        d1 = (r[last] - r[prev]) / (last - prev)  # first finite difference
        if c == 4:
            d1_old = r[2] - r[1]
        else:
            before = c - 5 if c > 6 else 2
            d1_old = (r[prev] - r[before]) / (prev - before)
        d2 = (d1 - d1_old) / (last - prev)
        # Taylor expansion around the last computed call, dt = 1
        want = [r[last], r[last] + d1, r[last] + d1 + d2 / 2][order]
        torch.testing.assert_close(spy.outputs[c], spy.inputs[c] + want, rtol=1e-5, atol=1e-5)
        assert (want - r[last]).norm() > 0.01 * r[last].norm() or order == 0


def test_taylorseer_forecast_beats_plain_reuse():
    model = real_dit()
    assert block_share(model) > 0.5
    plain = run(model, steps=12)
    errs = {}
    for order in (0, 1):
        handle = accel.apply(model, TaylorSeerConfig(interval=2, order=order, warmup_steps=3))
        out = run(model, [handle], steps=12)
        s = accel.summary(model)["default"]
        accel.remove(model)
        assert s["cached_steps"] == [4, 6, 8, 10]
        errs[order] = rel_err(out, plain)
    with identity_blocks(model, range(4), [4, 6, 8, 10]):
        errs["zero"] = rel_err(run(model, steps=12), plain)
    errs["reuse"] = rel_err(run(model, [ReusePrediction([4, 6, 8, 10])], steps=12), plain)
    # the residual reused (order 0) beats the identity and the prediction reused; the
    # first-order forecast beats the residual reused
    assert errs[0] < errs["zero"] / 5 and errs[0] < errs["reuse"] / 2, errs
    assert errs[1] < errs[0] / 1.5, errs


def test_heun_and_guidance_off_still_work():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig(threshold=0.5))
    out = run(model, [handle], steps=4, method="heun", guidance=1.0)
    assert handle.num_calls == 7 and torch.isfinite(out).all()
