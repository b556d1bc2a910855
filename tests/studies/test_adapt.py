import json
import subprocess
import sys

import pytest

from adaptdiff.cli import main
from adaptdiff.studies import adapt


@pytest.mark.slow
def test_adapt_quick_runs_every_method(tmp_path, capsys):
    assert main(["adapt", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == list(adapt.METHODS)
    total = rows["full"]["total"]
    assert rows["full"]["trainable"] == total
    for name, r in rows.items():
        assert 0 < r["trainable"] <= total and r["step_cpu_ms"] > 0
        for split in ("new", "old"):
            assert 0 <= r[split]["accuracy"] <= 1 and r[split]["fd"] >= 0
        if name != "full":
            assert (tmp_path / f"{name}.safetensors").exists()
            assert r["trainable"] < 0.1 * total
    assert "real digits" in capsys.readouterr().out


def test_adapt_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        adapt.run_adapt(adapt.AdaptConfig(out_dir=str(tmp_path), methods=("nope",), quick=True))


PEAK_RSS_CHILD = """
import torch
from adaptdiff.studies import adapt

start = adapt.reset_peak_rss()
if start is None:
    print("skip")
else:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    print(adapt.peak_rss_kib() - start)
"""


def test_peak_rss_reset_measures_new_allocations():
    # A fresh process: in a long test session the allocator may reuse resident memory that an
    # earlier test freed, so a new 64 MiB tensor need not raise the peak at all.
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    grown = done.stdout.split()[-1]
    if grown == "skip":
        pytest.skip("no /proc/self/clear_refs here")
    assert int(grown) >= 60 * 1024


@pytest.mark.slow
def test_adapt_study_quick_end_to_end(tmp_path, capsys):
    assert main(["study", "adapt", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["study"] == "adapt" and result["quick"] and result["seeds"] == [0, 1]
    summary = result["summary"]
    assert list(summary) == ["base (0-4)", *adapt.METHODS, "real digits"]
    for name in adapt.METHODS:
        fd = summary[name]["new_fd"]
        assert len(fd["values"]) == 2 and fd["std"] >= 0 and fd["mean"] > 0
        assert (tmp_path / "seed-1" / f"{name}.safetensors").exists() or name == "full"
    assert (tmp_path / "adapt.png").exists() and (tmp_path / "table.txt").exists()
    assert "mean ± std over 2 seeds" in capsys.readouterr().out


def test_adapt_with_seeds_runs_the_study_over_them(tmp_path, monkeypatch):
    import adaptdiff.studies as studies

    called = {}

    def fake_run_study(study, **kwargs):  # the routing only; the study itself runs above
        called.update(study=study.name, **kwargs)

    monkeypatch.setattr(studies, "run_study", fake_run_study)
    args = ["adapt", "lora", "difffit", "--seeds", "3", "--quick", "--out", str(tmp_path),
            "--adapt-steps", "7", "--threads", "2"]  # fmt: skip
    assert main(args) == 0
    overrides = ["threads=2", "methods=lora,difffit", "adapt_steps=7"]
    assert called == dict(
        study="adapt", quick=True, seeds=3, out=str(tmp_path), overrides=overrides
    )
    cfg = studies.runner.configure(adapt.STUDY, overrides=called["overrides"])
    assert cfg.methods == ("lora", "difffit") and cfg.adapt_steps == 7 and cfg.threads == 2
    with pytest.raises(SystemExit):  # exit status 2, one line
        main(["adapt", "--seeds", "0", "--out", str(tmp_path)])
