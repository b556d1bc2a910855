import json
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest

from adaptdiff._pyplot import pyplot
from adaptdiff.cli import main
from adaptdiff.studies import STUDIES, Column, Study, get_study, run_study
from adaptdiff.studies.runner import aggregate, configure, errorbars


@dataclass
class ToyConfig:
    scale: float = 1.0
    size: int = 10
    names: tuple[str, ...] = ("a", "b")
    flag: bool = False
    limit: int | None = None


def _toy_run(cfg, seed, out, progress):
    out.mkdir(parents=True)
    (out / "seed.txt").write_text(str(seed))
    progress.log(f"seed {seed}")
    for name in cfg.names:
        progress.advance(name)
    return {
        "row": {"x": cfg.scale * seed, "size": cfg.size, "na": None},
        "floor": {"x": 0.5},
    }


def _toy_plot(summary, path):
    plt = pyplot()
    fig, ax = plt.subplots()
    errorbars(ax, summary, ["row"], "x", "size")
    fig.savefig(path)
    plt.close(fig)


TOY = Study(
    name="toy",
    summary="a study of nothing",
    config=ToyConfig,
    quick=lambda cfg: replace(cfg, size=2),
    run=_toy_run,
    columns=(Column("x", "x"), Column("size", "size", "{:.0f}"), Column("na", "na")),
    plot=_toy_plot,
    units=lambda cfg: len(cfg.names),
    note=lambda cfg: f"size {cfg.size}",
)


def test_seeds_reduce_to_mean_and_sample_std(tmp_path, capsys):
    result = run_study(TOY, seeds=3, out=tmp_path, progress=False)
    x = result["summary"]["row"]["x"]
    assert x["values"] == [0.0, 1.0, 2.0] and x["mean"] == 1.0 and x["std"] == pytest.approx(1.0)
    assert result["summary"]["row"]["size"] == {"mean": 10, "std": 0.0, "values": [10] * 3}
    assert result["summary"]["row"]["na"] == {"mean": None, "std": None, "values": [None] * 3}
    assert result["seeds"] == [0, 1, 2] and result["config"]["size"] == 10
    out = capsys.readouterr().out
    assert "1.00 ± 1.00" in out and "mean ± std over 3 seeds" in out and "size 10" in out
    assert "n/a" in out


def test_files_written(tmp_path):
    run_study(TOY, seeds=2, out=tmp_path, progress=False)
    assert json.loads((tmp_path / "results.json").read_text())["study"] == "toy"
    assert "± " in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert [(tmp_path / f"seed-{s}" / "seed.txt").read_text() for s in (0, 1)] == ["0", "1"]


def test_one_seed_has_no_spread(tmp_path):
    result = run_study(TOY, seeds=1, out=tmp_path, progress=False)
    assert result["summary"]["row"]["x"]["std"] is None
    assert "±" not in (tmp_path / "table.txt").read_text()


def test_quick_shrinks_the_config_and_defaults_to_two_seeds(tmp_path):
    result = run_study(TOY, quick=True, out=tmp_path, progress=False)
    assert result["quick"] and result["seeds"] == [0, 1] and result["config"]["size"] == 2


def test_overrides_parse_by_field_type():
    cfg = configure(TOY, overrides=["scale=0.5", "names=p,q,r", "flag=true", "limit=none"])
    assert (cfg.scale, cfg.names, cfg.flag, cfg.limit) == (0.5, ("p", "q", "r"), True, None)
    assert configure(TOY, overrides=["limit=4"]).limit == 4
    assert configure(TOY, quick=True, overrides=["size=7"]).size == 2  # quick's sizes win
    with pytest.raises(ValueError, match="FIELD one of scale, size"):
        configure(TOY, overrides=["nope=1"])
    with pytest.raises(ValueError, match="true or false"):
        configure(TOY, overrides=["flag=maybe"])


def test_seeds_must_agree_on_rows_and_n_a():
    with pytest.raises(ValueError, match="not every seed reports row/y"):
        aggregate([{"row": {"y": 1.0}}, {"row": {"x": 1.0}}])
    with pytest.raises(ValueError, match="expected numbers in every seed"):
        aggregate([{"row": {"x": 1.0}}, {"row": {"x": None}}])


def test_unknown_study_lists_the_studies(capsys):
    with pytest.raises(ValueError, match="unknown study 'nope'; studies: adapt"):
        get_study("nope")
    with pytest.raises(SystemExit) as e:
        main(["study", "nope"])
    assert e.value.code == 2
    assert "studies: adapt" in capsys.readouterr().err


def test_registered_studies_load():
    for name in STUDIES:
        study = get_study(name)
        assert study.name == name and study.columns and study.summary


def test_adapt_verb_is_an_alias_of_the_adapt_study(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", "nope", "--quick", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
    r = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c",
         "import adaptdiff.adapt as a, adaptdiff.studies.adapt as s; assert a is s"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "adaptdiff.adapt moved to adaptdiff.studies.adapt" in r.stderr


def test_a_study_that_sets_its_threads_leaves_the_callers_as_they_were(tmp_path):
    import torch

    def run(cfg, seed, out, progress):
        torch.set_num_threads(1)  # as every study does with its config's ``threads``
        return _toy_run(cfg, seed, out, progress)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_study(replace(TOY, run=run), seeds=1, out=tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
