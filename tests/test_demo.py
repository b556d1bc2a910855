import json

import pytest
import torch

from adaptdiff import _schema, cli, demo
from adaptdiff.recipes import digits as recipe
from adaptdiff.recipes.digits import Row

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(name, fd, accuracy, seconds=1.0, nfe=8):
    method, steps = name.split()
    return Row(name, method, int(steps), nfe, seconds, fd, accuracy, evals=2.0 * nfe)


def _runs():
    # two settings, three runs (trained model x noise seed); the floor per run
    fds = [(15.0, 14.0), (16.0, 14.5), (17.0, 15.5)]
    return [
        demo.run_metrics(
            [_row("euler 8", a, 0.98, seconds=2.0 + i), _row("dpmpp_2m 8", b, 0.99)], 13.0 + i
        )
        for i, (a, b) in enumerate(fds)
    ]


def test_runs_aggregate_to_mean_and_sample_std_per_column():
    summary = demo.aggregate_runs(_runs())
    assert list(summary) == ["euler 8", "dpmpp_2m 8", demo.REAL]
    fd = summary["euler 8"]["fd"]
    assert fd.mean == pytest.approx(16.0) and fd.std == pytest.approx(1.0)
    assert fd.values == [15.0, 16.0, 17.0]
    assert summary["dpmpp_2m 8"]["fd"].std == pytest.approx(torch.tensor([14.0, 14.5, 15.5]).std())
    assert summary["euler 8"]["accuracy"].std == 0.0  # the same in every run
    assert summary["euler 8"]["seconds"].mean == pytest.approx(3.0)
    assert summary[demo.REAL]["fd"].mean == pytest.approx(14.0)
    with pytest.raises(ValueError, match="runs is empty"):
        demo.aggregate_runs([])
    broken = _runs()
    del broken[1]["dpmpp_2m 8"]
    with pytest.raises(ValueError):  # every run must report the same rows
        demo.aggregate_runs(broken)


def test_mean_rows_carry_the_means_and_the_spreads():
    runs = _runs()
    rows = [_row("euler 8", 15.0, 0.98), _row("dpmpp_2m 8", 14.0, 0.99)]
    mean = demo.mean_rows(demo.aggregate_runs(runs), rows)
    assert [r.name for r in mean] == ["euler 8", "dpmpp_2m 8"]
    assert mean[0].fd == pytest.approx(16.0) and mean[0].extra["std"]["fd"] == pytest.approx(1.0)
    assert mean[0].nfe == 8 and isinstance(mean[0].nfe, int)


def test_the_table_shows_spreads_and_says_which_seeds_varied():
    summary = demo.aggregate_runs(_runs())
    table = demo.format_results(summary, [0], [0, 1, 2])
    lines = table.splitlines()
    assert "digits-FD" in lines[0] and "cond acc" in lines[0]
    euler = next(line for line in lines if line.startswith("euler 8"))
    assert "16.00 ± 1.00" in euler and "98.0%" in euler and "98.0% ±" not in euler
    assert " 8 " in euler and "8 ±" not in euler  # steps and NFE agree: one number
    real = next(line for line in lines if line.startswith(demo.REAL))
    assert "14.00 ± 1.00" in real
    assert lines[-1].startswith("mean ± std over 3 runs: 3 noise seeds (0, 1, 2) of one trained")
    two_by_three = demo.seeds_note([0, 1], [0, 1, 2])
    assert two_by_three.startswith("mean ± std over 6 runs: 2 training seeds (0, 1) x 3 noise")
    assert demo.seeds_note([0], [0]).startswith("one run")


def test_the_floor_draws_as_many_real_digits_of_each_class_as_the_samples_have():
    labels = torch.arange(200) % 10
    images = torch.arange(200.0).view(200, 1, 1, 1)  # each "digit" is its own index
    a = demo.real_digits(images, labels, 30, seed=0)
    b = demo.real_digits(images, labels, 30, seed=1)
    assert a.shape == (30, 1, 1, 1) and not torch.equal(a, b)
    assert torch.equal(a, demo.real_digits(images, labels, 30, seed=0))
    drawn = a.flatten().long()
    assert len(set(drawn.tolist())) == 30  # no digit twice
    assert torch.equal(labels[drawn].bincount(minlength=10), torch.full((10,), 3))
    with pytest.raises(ValueError, match="class"):
        demo.real_digits(images[:20], labels[:20], 300, seed=0)


@pytest.mark.parametrize("kwargs", [{"seeds": 0}, {"noise_seeds": 0}, {"seeds": True}])
def test_run_demo_rejects_bad_seed_counts_before_training(tmp_path, kwargs):
    with pytest.raises(ValueError, match="run_demo: (noise_)?seeds must be a positive int"):
        demo.run_demo(str(tmp_path), quick=True, **kwargs)
    assert not (tmp_path / "checkpoints").exists()


def test_training_seeds_keep_the_evaluators_split_and_older_model_files_load(tmp_path):
    assert recipe.DigitsTrainConfig(seed=2).data_seed == 0
    old = {k: v for k, v in vars(recipe.DigitsTrainConfig()).items() if k != "data_seed"}
    _schema.dump_json(tmp_path / "model.json", old, kind=recipe.MODEL_KIND, version=1)
    saved = _schema.load_json(
        tmp_path / "model.json", kind=recipe.MODEL_KIND, versions=(1,), fields=recipe._MODEL_FIELDS
    )
    assert "data_seed" not in saved  # written before the field: loads, split seed 0


@pytest.mark.slow
def test_demo_quick_writes_its_files_and_moe_adds_rows(tmp_path, monkeypatch, capsys):
    """One quick run with --moe (the slowest test: one run serves both checks)."""
    monkeypatch.setenv("ADAPTDIFF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--moe", "--out", str(out)]) == 0
    names = ("samples.png", "quality_vs_time.png", "results.json", "results.txt")
    for name in names + ("preview_000100.png", "moe/preview_000100.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["name"] for r in rows] == ["euler 8", "dpmpp_2m 8", "MoE euler 8", "MoE dpmpp_2m 8"]
    assert [(r["method"], r["steps"]) for r in rows] == [("euler", 8), ("dpmpp_2m", 8)] * 2
    assert len(results["moe_expert_load"]) > 0 and results["moe_train_seconds"] > 0
    for r in rows:
        assert r["nfe"] == 8  # a batched CFG call counts once; DPM-Solver++(2M) is one per step
        assert r["fd"] > 0 and 0.0 <= r["accuracy"] <= 1.0
    assert results["training_seeds"] == [0] and results["noise_seeds"] == [0, 1]  # quick: 2
    assert results["num_samples"] == 50
    fd = results["summary"]["euler 8"]["fd"]
    assert len(fd["values"]) == 2 and fd["std"] > 0  # two noises, two sample sets
    assert rows[0]["fd"] == pytest.approx(fd["mean"])
    assert len(results["summary"]["real digits"]["fd"]["values"]) == 2
    printed = capsys.readouterr().out
    assert "digits-FD" in printed and "euler 8" in printed
    assert "mean ± std over 2 runs: 2 noise seeds (0, 1) of one trained model" in printed

    # `adaptdiff sample` reuses the trained run.
    assert cli.main(["sample", "--out", str(out), "--method", "euler", "--steps", "4",
                     "--num", "20"]) == 0  # fmt: skip
    assert (out / "samples_euler_4.png").exists()


def test_sample_without_a_run_explains(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # one line and exit status 2, no traceback
        cli.main(["sample", "--out", str(tmp_path)])
    assert info.value.code == 2 and "train first" in capsys.readouterr().err


def test_each_plotted_line_holds_one_setting_over_its_step_counts():
    names = ["euler 4", "euler 16", "RAS 0.5 euler 16", "MoE euler 16", "MoE RAS 0.5 euler 32",
             "euler 16 +AG", "MoE euler 32 +AG+SADA", "dpmpp_2m 8"]  # fmt: skip
    assert [demo.plot_series(n) for n in names] == [
        "euler", "euler", "RAS 0.5 euler", "MoE euler", "MoE RAS 0.5 euler", "euler +AG",
        "MoE euler +AG+SADA", "dpmpp_2m",
    ]  # fmt: skip
