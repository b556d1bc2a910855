"""The sr study: its head counts, timing helper and the quick run end to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.studies.sr import ROWS, SRStudyConfig, _quick, _timed, num_local

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_num_local_is_the_fraction_of_all_heads():
    assert num_local(SRStudyConfig(depth=3, num_heads=4, local_fraction=0.5)) == 6
    assert num_local(SRStudyConfig(depth=2, num_heads=2, local_fraction=0.0)) == 0
    assert num_local(_quick(SRStudyConfig())) == 2


def test_timed_runs_without_gradients():
    w = torch.ones(3, requires_grad=True)
    out, secs = _timed(lambda x: x * w, torch.ones(4, 3))
    assert not out.requires_grad and secs >= 0 and out.shape == (4, 3)


def test_sr_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "sr", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["summary"]
    assert list(rows) == list(ROWS)
    for row in ROWS:
        assert rows[row]["psnr"]["mean"] > 0 and 0 < rows[row]["ssim"]["mean"] <= 1
    global_flops = rows["student, global"]["attn_mflops"]["mean"]
    assert rows["teacher"]["attn_mflops"]["mean"] == pytest.approx(3 * global_flops)
    # routing and the random baseline use the same number of local heads, hence the same cost
    for row in ("student, routed", "student, random heads"):
        assert rows[row]["local"]["mean"] == 2
        assert rows[row]["attn_mflops"]["mean"] < global_flops
    assert rows["student, routed"]["attn_mflops"] == rows["student, random heads"]["attn_mflops"]
    calib = json.loads((tmp_path / "seed-0" / "calibration.json").read_text())
    assert len(calib["neg_log_mass"]) == 2 and sum(map(sum, calib["routed_local"])) == 2
    assert all(0 < m < 1 for row in calib["mass"] for m in row)
    assert (tmp_path / "sr.png").exists()
    assert "x2 SR 16->32 of photo patches" in capsys.readouterr().out
