import json
import math

import pytest

from adaptdiff.accel.evaluate import Result
from adaptdiff.bench.accel import report, seeds

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(seed_shift: float, fd_exact=15.0, model="digits DiT-demo/4"):
    """One noise seed's rows: the exact run and two methods (B is faster at every seed)."""
    return [
        Result(model, "exact", "euler 28", 10.0 + seed_shift, 1.0, 28, 1.0, 99.0, 1.0,
               fd=fd_exact + seed_shift, accuracy=0.98),
        Result(model, "A", "t 1", 6.0, 1.6 + seed_shift / 10, 28, 0.6, 30.0 + seed_shift, 0.99,
               fd=16.0 + 2 * seed_shift, accuracy=0.97),
        Result(model, "B", "t 2", 5.0, 2.0, 20 + int(seed_shift), 0.5, 35.0, 0.995,
               fd=15.5, accuracy=0.99),
    ]  # fmt: skip


def test_noise_seeds_reduce_to_mean_and_sample_std_per_row():
    out = seeds.aggregate_results([_run(0), _run(1), _run(2)], [0, 1, 2])
    assert [(r.method, r.setting) for r in out] == [("exact", "euler 28"), ("A", "t 1"),
                                                     ("B", "t 2")]  # fmt: skip
    exact, a, b = out
    assert exact.fd == pytest.approx(16.0) and exact.extra["std"]["fd"] == pytest.approx(1.0)
    assert exact.psnr == 99.0 and exact.extra["std"]["psnr"] == 0.0
    assert a.psnr == pytest.approx(31.0) and a.extra["std"]["psnr"] == pytest.approx(1.0)
    assert a.fd == pytest.approx(18.0) and a.extra["std"]["fd"] == pytest.approx(2.0)
    assert b.nfe == pytest.approx(21.0)  # steps skipped per seed may differ: the mean
    assert all(r.extra["seeds"] == [0, 1, 2] for r in out)
    # Pareto points of the means: B is faster and closer to exact than A
    assert b.pareto and not a.pareto and exact.pareto


def test_one_seed_has_no_spread_and_missing_scores_stay_missing():
    rows = _run(0, model="DiT-B/2 random")
    for r in rows:
        r.fd = r.accuracy = None
    ((exact, *_),) = [seeds.aggregate_results([rows], [0])]
    assert exact.fd is None and exact.extra["std"]["fd"] is None
    assert exact.extra["std"]["seconds"] is None  # one seed: no standard deviation


def test_seeds_must_run_the_same_rows():
    other = _run(1)[::-1]
    with pytest.raises(ValueError, match="seed 1 ran other rows than seed 0"):
        seeds.aggregate_results([_run(0), other], [0, 1])
    with pytest.raises(ValueError, match="one result list per seed"):
        seeds.aggregate_results([_run(0)], [0, 1])
    half = _run(1)
    half[1].fd = None
    with pytest.raises(ValueError, match="fd missing in some seeds only"):
        seeds.aggregate_results([_run(0), half], [0, 1])


def test_random_weight_models_are_speed_only_and_tabled_apart():
    quality = seeds.mark_speed_only(seeds.aggregate_results([_run(0), _run(2)], [0, 2]), "digits")
    random = seeds.mark_speed_only(_run(0, model="DiT-B/2 random"), "dit-b")
    assert all(r.extra["speed_only"] is False for r in quality)
    assert all(r.extra["speed_only"] is True for r in random)
    text = report.format_tables(quality + random)
    head, tail = text.split("Speed-only rows")
    assert "Quality rows (trained models)" in head and "DiT-B/2 random" not in head
    assert "| digits DiT-demo/4 | A | t 1 |" in head and "digits DiT-demo/4" not in tail
    a_line = next(line for line in head.splitlines() if "| A |" in line)
    assert "18.00 ± 2.83" in a_line and "31.0 ± 1.4" in a_line  # fd and PSNR over seeds 0, 2
    assert "mean ± std over noise seeds 0, 2" in head
    assert "| DiT-B/2 random | A | t 1 |" in tail and "±" not in tail


def test_recorded_rows_keep_their_spreads_and_labels_through_render(tmp_path):
    quality = seeds.mark_speed_only(seeds.aggregate_results([_run(0), _run(1)], [0, 1]), "digits")
    random = seeds.mark_speed_only(_run(0, model="DiT-B/2 random"), "dit-b")
    path = tmp_path / "accel.jsonl"
    report.write_json(path, {"device": "cpu", "clock": "cpu"}, quality + random, [])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1]["std"]["fd"] == pytest.approx(math.sqrt(2)) and rows[1]["seeds"] == [0, 1]
    assert rows[0]["speed_only"] is False and rows[-1]["speed_only"] is True
    assert "std" not in rows[-1]
    out = tmp_path / "redrawn"
    assert report.render([str(path)], out) == 0
    redrawn = (out / "accel.md").read_text()
    assert redrawn.startswith("Quality rows") and "17.00 ± 1.41" in redrawn
    assert "Speed-only rows" in redrawn


def test_seeds_and_methods_options():
    from adaptdiff.bench.accel import build_parser, main

    args = build_parser().parse_args(["--methods", "RAS,fewer steps,AG"])
    assert args.methods == {"RAS", "fewer steps", "AG"} and args.seeds == 3
    assert build_parser().parse_args([]).methods is None  # every method
    assert main(["--models", "digits", "--seeds", "0"]) == 2


def test_a_trained_models_seeds_are_saved_as_each_finishes(tmp_path, monkeypatch):
    """An interrupted quality run keeps the noise seeds it finished (provisional rows, marked
    with their seed); a finished run's final rows replace them (the pipelines' RowLog)."""
    from types import SimpleNamespace

    from adaptdiff.bench.accel import digits
    from adaptdiff.models.dit import create_dit

    calls = []

    def evaluate(model, methods, *, seed, **kwargs):
        calls.append(seed)
        if seed == 1:
            raise KeyboardInterrupt  # as if the run were stopped during the second seed
        return _run(0.0)

    monkeypatch.setattr(digits, "evaluate", evaluate)
    path = tmp_path / "accel.jsonl"
    args = SimpleNamespace(quick=True, methods={"RAS"}, seeds=3, repeats=1, clock="cpu",
                           row_log=report.RowLog(path, {"threads": 1}))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        digits.run_trained(args, 8, create_dit("DiT-tiny/2", input_size=8), "m", evaluator=None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert calls == [0, 1]
    assert [(r["method"], r["noise_seed"], r["partial"]) for r in rows] == [
        ("exact", 0, True),
        ("A", 0, True),
        ("B", 0, True),
    ]
    args.row_log.rewind()
    assert path.read_text() == ""
