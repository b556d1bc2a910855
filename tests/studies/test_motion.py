"""The motion study: its metrics on rendered clips and the quick run end to end."""

import json

import pytest

from adaptdiff.cli import main
from adaptdiff.data.moving_digits import MOTIONS, moving_digits
from adaptdiff.metrics.digits import DigitsEvaluator
from adaptdiff.studies.motion import digit_frames, reference_for, score

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_references_differ_per_seed():
    refs = [reference_for(s) for s in range(3)]
    assert len({c for c, _ in refs}) == 3 and len({m for _, m in refs}) == 3
    assert all(m in MOTIONS for _, m in refs)


def test_score_reads_rendered_clips_of_a_known_motion():
    """Real clips of one motion score as that motion, with the step error near 0 for a
    translation, and the digits classifier reads most frames of held-out digits right."""
    clips, labels, _ = moving_digits(40, motions=("right",), split="test", seed=5)
    evaluator = DigitsEvaluator(16)
    got = score(clips, labels, "right", reference_class=11, evaluator=evaluator)
    assert got["motion_acc"] == 1.0 and got["step_err"] < 1e-3
    assert got["new_acc"] > 0.7 and got["leak"] == 0.0  # class 11 does not exist
    wrong = score(clips, labels, "up", reference_class=11, evaluator=evaluator)
    assert wrong["motion_acc"] == 0.0 and wrong["step_err"] == pytest.approx(0.75 * 2**0.5, 1e-3)
    assert digit_frames(clips).shape == (320, 1, 16, 16)


@pytest.mark.slow  # about 8 s on a quiet 2-core machine
def test_motion_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "motion", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["summary"]
    assert list(rows) == ["base", "plain MSE", "debiased"]
    for row in rows.values():
        for metric in ("motion_acc", "new_acc", "leak"):
            assert 0.0 <= row[metric]["mean"] <= 1.0
        assert row["step_err"]["mean"] >= 0.0
    assert (tmp_path / "motion.png").exists() and (tmp_path / "seed-0" / "clips.pt").exists()
    assert "debiased" in capsys.readouterr().out
