"""`adaptdiff calibrate`: the registry, the CLI, the JSON it writes and its validation."""

import json

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import MagCacheConfig, TeaCacheConfig, load_calibration
from adaptdiff.accel.calibration import CALIBRATORS, register_calibrator, run_calibration
from adaptdiff.accel.cli import calibration_setup
from adaptdiff.cli import main

from .support import run, tiny_dit


def _cli(tmp_path, method, *extra):
    out = tmp_path / f"{method}.json"
    rc = main(
        [
            "calibrate",
            "--method",
            method,
            "--model",
            "DiT-tiny/2",
            "--steps",
            "6",
            "--runs",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )  # fmt: skip; later flags win
    assert rc == 0
    return out


def test_teacache_calibration_cli(tmp_path, capsys):
    path = _cli(tmp_path, "teacache", "--option", "degree=2")
    assert f"wrote {path}" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert doc["format"] == "adaptdiff.calibration" and doc["method"] == "teacache"
    assert len(doc["coefficients"]) == 3 and doc["points"] == 2 * 2 * 5
    assert doc["sampling"]["steps"] == 6 and doc["model"]["class"] == "DiT"
    # the CLI's --model builds the same random DiT as random_dit("DiT-tiny/2", seed=0)
    from adaptdiff.accel.cli import random_dit

    model = random_dit("DiT-tiny/2", seed=0)
    handle = accel.apply(model, TeaCacheConfig(threshold=0.2, coefficients=str(path)))
    assert torch.isfinite(run(model, [handle], steps=6)).all()


def test_magcache_calibration_cli(tmp_path):
    path = _cli(tmp_path, "magcache", "--sampler", "heun")
    doc = json.loads(path.read_text())
    assert len(doc["mag_ratios"]) == doc["calls"] == 11  # heun: 2 * 6 - 1 calls
    assert doc["mag_ratios"][0] == 1.0 and all(r > 0 for r in doc["mag_ratios"])
    from adaptdiff.accel.cli import random_dit

    model = random_dit("DiT-tiny/2", seed=0)
    handle = accel.apply(model, MagCacheConfig(mag_ratios=str(path), threshold=0.5))
    assert torch.isfinite(run(model, [handle], steps=6)).all()


def test_schedule_searches_write_loadable_schedules(tmp_path, capsys):
    from adaptdiff.accel import Schedule
    from adaptdiff.accel.cli import random_dit

    model = random_dit("DiT-tiny/2", seed=0)
    bac = Schedule.load(_cli(tmp_path, "bac", "--option", "budget=3"), model=model)
    assert bac.num_steps == 6 and bac.meta["method"] == "bac"
    assert bac.compute_fraction() < 1
    path = _cli(tmp_path, "ecad", "--option", "pop=4", "--option", "generations=1",
                "--option", "target=0.9", "--sampler", "heun", "--steps", "3")  # fmt: skip
    ecad = Schedule.load(path, model=model)
    assert ecad.num_steps == 5 and ecad.compute_fraction() <= 0.9
    assert ecad.meta["front"] and ecad.meta["sampling"]["calls"] == 5
    handle = accel.apply(model, accel.ScheduleConfig(str(path)))
    run(model, [handle], steps=3, method="heun")
    assert accel.summary(model)["default"]["hits"] > 0
    with pytest.raises(SystemExit) as exit_info:  # a bad option: one line, status 2
        _cli(tmp_path, "bac", "--option", "budget=lots")
    assert exit_info.value.code == 2
    assert "option value 'lots' is not a float" in capsys.readouterr().err


def test_calibration_validation(tmp_path):
    model = tiny_dit()
    setup = calibration_setup(model, steps=4, runs=1)
    doc = run_calibration("magcache", setup)
    assert load_calibration(doc, "magcache", model) is doc
    with pytest.raises(ValueError, match="calibrates 'magcache', not 'teacache'"):
        load_calibration(doc, "teacache", model)
    with pytest.raises(ValueError, match="version 7 unsupported"):
        load_calibration({**doc, "version": 7}, "magcache")
    with pytest.raises(ValueError, match="not an adaptdiff calibration"):
        load_calibration({"coefficients": [1]}, "teacache")
    with pytest.raises(ValueError, match="made for a model with blocks=4, this one has blocks=2"):
        load_calibration(doc, "magcache", tiny_dit(depth=2))
    with pytest.raises(ValueError, match="'mag_ratios' must be a list"):
        load_calibration({**doc, "mag_ratios": [1.0]}, "magcache")
    with pytest.raises(ValueError, match="'mag_ratios' has 4 values but 'calls' is 3"):
        load_calibration({**doc, "calls": 3}, "magcache")
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**doc, "model": {**doc["model"], "parameters": 1}}))
    with pytest.raises(ValueError, match="parameters=1"):
        accel.apply(tiny_dit(), MagCacheConfig(mag_ratios=str(path)))
    with pytest.raises(ValueError, match="not found"):
        load_calibration(tmp_path / "nope.json", "teacache")
    handle = accel.apply(model, MagCacheConfig(mag_ratios=doc))  # a loaded document works too
    assert torch.isfinite(run(model, [handle], steps=4)).all()


def test_registry_is_extensible(tmp_path):
    @register_calibrator("unit_test_method", "counts calls")
    def _count(setup):
        return {"calls": [len(setup.sample(r, [])) for r in range(setup.runs)]}

    try:
        out = _cli(tmp_path, "unit_test_method")
        assert json.loads(out.read_text())["calls"] == [2, 2]
    finally:
        CALIBRATORS.pop("unit_test_method")
    with pytest.raises(SystemExit, match="--method must be one of"):
        main(["calibrate", "--method", "nope", "--model", "DiT-tiny/2"])
    with pytest.raises(SystemExit, match="exactly one of --checkpoint and --model"):
        main(["calibrate", "--method", "teacache"])
