"""``accel.apply`` installs every training-free method's config; ``accel.remove`` undoes it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.guidance.adaptive import save_linear_ag

from .support import run, tiny_dit

STEPS = 8
LAG = {i: [0.5, 0.2, 0.3] for i in (2, 4, 6)}


def _schedule(model):
    sched = accel.Schedule.for_model(model, STEPS)
    for s in (2, 5):
        sched.mask[s] = [[False, True] for _ in accel.layout(model)]
    return sched


CONFIGS = {
    "first_block_cache": lambda m, tmp: accel.FirstBlockCacheConfig(threshold=0.5),
    "teacache": lambda m, tmp: accel.TeaCacheConfig(threshold=0.5),
    "magcache": lambda m, tmp: accel.MagCacheConfig(mag_ratios=[1.0] * STEPS),
    "taylorseer": lambda m, tmp: accel.TaylorSeerConfig(interval=2),
    "schedule": lambda m, tmp: accel.ScheduleConfig(_schedule(m)),
    "ras": lambda m, tmp: accel.RASConfig(sample_ratio=0.5, start_step=2),
    "adaptive_guidance": lambda m, tmp: accel.AdaptiveGuidanceConfig(0.9),
    "linear_ag": lambda m, tmp: accel.LinearAGConfig(LAG, steps=(2, 4, 6)),
    "linear_ag_file": lambda m, tmp: accel.LinearAGConfig(_lag_file(tmp)),
    "sada": lambda m, tmp: accel.SADAConfig(start=0.0, end=1.0),
    "sada_tokens": lambda m, tmp: accel.SADAConfig(start=0.0, end=1.0, tokens=True),
    "entropy_scaling": lambda m, tmp: accel.EntropyScalingConfig(train_tokens=4),
}


def _lag_file(tmp_path):
    path = tmp_path / "linear-ag.json"
    save_linear_ag(path, LAG, history=1, num_steps=STEPS)
    return path


def _forward(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model(x, torch.tensor([0.3, 0.7]) * 1000, torch.tensor([1, 2]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_apply_runs_every_method_and_remove_restores_the_model_bit_for_bit(name, tmp_path):
    model = tiny_dit()
    before = _forward(model)
    plain = run(model, steps=STEPS)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    handle = accel.apply(model, CONFIGS[name](model, tmp_path))
    out = run(model, [handle], steps=STEPS)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain)  # the method acted
    summary = accel.summary(model)["default"]
    assert summary["model_calls"] > 0 and set(summary) > {"model_calls", "hits", "misses"}
    accel.remove(model)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert torch.equal(_forward(model), before)
    assert torch.equal(run(model, steps=STEPS), plain)


def test_linear_ag_config_from_a_file_equals_the_coefficients(tmp_path):
    model = tiny_dit()
    outs = []
    for cfg in (accel.LinearAGConfig(_lag_file(tmp_path)), accel.LinearAGConfig(LAG)):
        outs.append(run(model, [accel.apply(model, cfg)], steps=STEPS))
        accel.remove(model)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="come from the calibration file"):
        accel.LinearAGConfig(_lag_file(tmp_path), history=1)


def test_configs_check_their_fields():
    with pytest.raises(ValueError, match="criterion must be"):
        accel.SADAConfig(criterion="nope")
    with pytest.raises(ValueError, match="start must be in"):
        accel.AdaptiveGuidanceConfig(start=2.0)
    with pytest.raises(ValueError, match="train_tokens must be >= 2"):
        accel.EntropyScalingConfig(train_tokens=1)
    with pytest.raises(ValueError, match="max_cached must be None or >= 1, got 0"):
        accel.FirstBlockCacheConfig(max_cached=0)
    with pytest.raises(ValueError, match="interval must be >= 1, got 0"):
        accel.TaylorSeerConfig(interval=0)


@pytest.mark.slow  # two fresh interpreters
def test_importing_adaptdiff_accel_registers_every_calibrator():
    """``import adaptdiff.accel`` alone registers them all, and ``adaptdiff calibrate``'s
    ``--method`` lists the same ones (each in a fresh interpreter)."""
    expected = ["autodiffusion", "bac", "ecad", "guidance-policy", "linear-ag", "magcache"]
    expected += ["teacache"]
    code = "import json, adaptdiff.accel as a; print(json.dumps(sorted(a.CALIBRATORS)))"
    registered = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))
    assert registered == expected
    code = "from adaptdiff.cli import main; main(['calibrate', '--help'])"
    env = {**os.environ, "COLUMNS": "1000"}  # one line per option
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and f"one of {expected}" in out.stdout


def test_removing_through_the_handle_frees_the_model_for_the_next_apply():
    model = tiny_dit()
    handle = accel.apply(model, accel.FirstBlockCacheConfig(threshold=0.5))
    handle.remove()  # as recipes.digits.generate does with accelerators it made per run
    with pytest.raises(ValueError, match="has no adaptdiff.accel hooks"):
        accel.get_handle(model)
    again = accel.apply(model, accel.FirstBlockCacheConfig(threshold=0.5))
    assert accel.get_handle(model) is again
    accel.remove(model)
