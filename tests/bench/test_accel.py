import json
import math

import pytest

from adaptdiff.accel.evaluate import Result
from adaptdiff.bench import accel as bench_accel
from adaptdiff.bench.accel import comparison, diffusers_dit, digits


def _row(method, speedup, psnr, compute=0.5, model="m"):
    return Result(model, method, "", 1.0, speedup, 8, compute, psnr, 1.0)


def test_method_front_keeps_a_methods_non_dominated_skipping_points():
    rows = [_row("A", 1.5, 40), _row("A", 2.0, 41), _row("A", 3.0, 30), _row("A", 1.1, 99),
            _row("B", 9.0, 90)]  # fmt: skip
    assert comparison.method_front(rows, "A") == [(2.0, 41), (3.0, 30)]  # 1.5 dominated, 99 exact
    saved = comparison.method_front([_row("A", 2, 40, compute=0.25)], "A", "saved")
    assert saved == [(0.75, 40)]


def test_psnr_at_interpolates_inside_and_tolerates_timing_noise_at_the_ends():
    front = [(2.0, 40.0), (4.0, 30.0)]
    assert comparison.psnr_at(front, 3.0) == pytest.approx(35.0)
    assert comparison.psnr_at(front, 4.1) == 30.0  # within 5 %
    assert comparison.psnr_at(front, 5.0) is None
    assert comparison.psnr_at(front, 1.0) is None


def test_equal_speedup_compares_each_reference_point_with_our_best_cache():
    ref = comparison.REFERENCE
    rows = [_row(ref, 2.0, 38), _row(ref, 3.0, 30), _row("FirstBlockCache", 1.8, 40),
            _row("FirstBlockCache", 3.2, 28), _row("TaylorSeer", 2.0, 39),
            _row("RAS", 2.5, 60)]  # fmt: skip
    out = comparison.equal_speedup(rows)
    assert [r["at"] for r in out] == [2.0, 3.0]
    first, second = out
    assert first["best"] == "TaylorSeer" and first["best_psnr"] == 39
    assert first["psnr"]["FirstBlockCache"] == pytest.approx(40 - 12 / 1.4 * 0.2)
    assert first["at_least_as_faithful"] is True
    assert second["best"] == "FirstBlockCache" and second["at_least_as_faithful"] is False
    assert second["psnr"]["TaylorSeer"] is None and second["psnr"]["MagCache"] is None
    assert "diffusers 0.3 dB better" in comparison.format_equal_speedup(out)
    assert comparison.equal_speedup([_row(ref, 1.0, 99)]) == []


def test_sweep_thresholds_are_multiples_of_the_measured_median_change():
    # the first call's change (warm-up) is left out of the medians: 0.1, 0.05 and |1 - 1.01|
    ind = diffusers_dit.Indicators([9.0, 0.1, 0.1, 0.2], [9.0, 0.05, 0.05], [1.0, 5.0, 1.01, 1.01])
    sweep = diffusers_dit.Sweep.from_indicators(ind, quick=False)
    assert sweep.first_block[:2] == [0.075, 0.1] and sweep.first_block[-1] == 0.5
    assert sweep.teacache[:2] == [0.05, 0.1]
    assert sweep.magcache[0] == (0.01, 3) and sweep.magcache[-1] == (0.16, 8)
    quick = diffusers_dit.Sweep.from_indicators(ind, quick=True)
    assert quick.first_block == [0.2] and quick.taylor_intervals == [3]


@pytest.mark.slow
def test_quick_accel_benchmark_writes_table_plot_and_json(tmp_path, capsys):
    path = tmp_path / "accel.jsonl"
    args = ["--quick", "--models", "dit-b", "--threads", "1", "--clock", "cpu",
            "--out", str(tmp_path), "--json", str(path)]  # fmt: skip
    assert bench_accel.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows][0] == "exact"
    assert {r["method"] for r in rows[1:]} >= {"RAS", "SADA", "FirstBlockCache"}
    assert all(r["speedup"] > 0 for r in rows)
    sadas = [r for r in rows if r["method"] == "SADA"]
    for sada in sadas:  # per sample, a call may carry some of the rows only
        assert sada["nfe"] < rows[0]["nfe"] and sada["compute"] <= sada["nfe"] / rows[0]["nfe"]
    whole = next(r for r in sadas if r["setting"].startswith("whole batch"))
    assert whole["compute"] == whole["nfe"] / rows[0]["nfe"]
    assert (tmp_path / "accel.png").stat().st_size > 0
    assert "| RAS" in (tmp_path / "accel.md").read_text()
    redrawn = tmp_path / "redrawn"
    assert bench_accel.main(["--render", str(path), "--out", str(redrawn)]) == 0
    assert (redrawn / "accel.md").read_text() == (tmp_path / "accel.md").read_text()
    assert (redrawn / "accel.png").stat().st_size > 0
    assert bench_accel.main(["--models", "nope"]) == 2
    assert "speedup" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_diffusers_part_sweeps_both_first_block_caches_and_compares_them(tmp_path, capsys):
    pytest.importorskip("diffusers")
    path = tmp_path / "accel.jsonl"
    args = ["--quick", "--models", "diffusers", "--threads", "1", "--clock", "cpu",
            "--out", str(tmp_path), "--json", str(path)]  # fmt: skip
    assert bench_accel.main(args) == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    rows = {r["method"]: r for r in lines if r["benchmark"] == "accel"}
    ours, theirs = rows["FirstBlockCache"], rows[comparison.REFERENCE]
    assert not math.isnan(theirs["compute"]) and theirs["compute"] < 1  # it skipped
    # the same indicator, threshold and warm-up: the same steps skipped, the same samples
    assert ours["compute"] == pytest.approx(theirs["compute"])
    assert ours["psnr"] == pytest.approx(theirs["psnr"], abs=0.01)
    compared = [r for r in lines if r["benchmark"] == "accel-equal-speedup"]
    assert {r["matched_on"] for r in compared} == {"speedup", "saved"}
    out = capsys.readouterr().out
    assert "indicator first-block residual change" in out and "PSNR at equal speedup" in out
    assert bench_accel.main(["--render", str(path), "--out", str(tmp_path / "r")]) == 0


def test_cli_routes_bench_accel_to_its_own_options(capsys):
    from adaptdiff.cli import main

    assert main(["bench", "accel", "--models", "nope"]) == 2
    assert "--models must name" in capsys.readouterr().err


def test_a_stale_cached_digits_model_is_trained_again_but_a_users_raises(tmp_path, monkeypatch):
    import adaptdiff.recipes.digits as demo

    trained = []
    monkeypatch.setattr(demo, "train_digits", lambda cfg: (trained.append(cfg.out_dir), None))
    stale = tmp_path / "cache"
    stale.mkdir()
    (stale / "model.json").write_text('{"steps": 600}')  # an older version's file: no kind
    with pytest.raises(ValueError, match="kind"):
        digits.digits_model(stale, 10)
    assert trained == [] and stale.exists()
    assert digits.digits_model(stale, 10, cached=True) is None
    assert trained == [str(stale)] and not (stale / "model.json").exists()


@pytest.mark.slow
def test_quick_latent_model_gives_quality_rows_scored_on_decoded_digits(tmp_path):
    path = tmp_path / "accel.jsonl"
    args = ["--quick", "--models", "latent", "--methods", "RAS", "--seeds", "2",
            "--threads", "1", "--latent-dir", str(tmp_path / "latent"),
            "--out", str(tmp_path), "--json", str(path)]  # fmt: skip
    assert bench_accel.main(args) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["exact", "RAS", "RAS"]  # two ratios in --quick
    assert all(r["model"].startswith("latent DiT (8x8x4)") for r in rows)
    assert all(r["speed_only"] is False and r["seeds"] == [0, 1] for r in rows)
    assert all(r["fd"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "latent" / "vae" / "config.json").exists()  # a diffusers AutoencoderKL
