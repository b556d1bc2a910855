"""The divcontrol study: configuration checks and the quick run end to end."""

import dataclasses
import json

import pytest

from adaptdiff.cli import main
from adaptdiff.studies import get_study
from adaptdiff.studies.divcontrol import DivControlConfig


def test_bad_conditions_are_refused(tmp_path):
    study = get_study("divcontrol")
    cfg = study.quick(DivControlConfig())
    from adaptdiff.studies.runner import Progress

    with pytest.raises(ValueError, match="divcontrol: unknown condition 'depth'"):
        study.run(dataclasses.replace(cfg, held_out="depth"), 0, tmp_path, Progress())
    with pytest.raises(ValueError, match="held_out 'edges' is also a training condition"):
        study.run(dataclasses.replace(cfg, held_out="edges"), 0, tmp_path, Progress())


@pytest.mark.slow  # about 25 s idle, 60 s on 2 busy cores
def test_divcontrol_quick_runs_every_phase(tmp_path, capsys):
    assert main(["study", "divcontrol", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    cfg = DivControlConfig()
    for method in ("multi", "divcontrol"):
        for c in cfg.train_conditions:
            assert rows[f"{method}: {c}"]["trainable"]["mean"] > 0
        assert rows[f"{method}: blur zero-shot"]["trainable"]["mean"] == 0
        assert rows[f"{method}: blur +3 steps"]["trainable"]["mean"] > 0
    # the tailors are a fraction of the branch
    assert (
        rows["divcontrol: blur +3 steps"]["trainable"]["mean"]
        < rows["multi: blur +3 steps"]["trainable"]["mean"]
    )
    for c in (*cfg.train_conditions, "blur"):
        assert "trainable" not in rows[f"base: {c}"]
    assert (tmp_path / "divcontrol.png").exists()
    assert "gate" in (tmp_path / "seed-0" / "gate.txt").read_text()
    assert "divcontrol: blur zero-shot" in capsys.readouterr().out
