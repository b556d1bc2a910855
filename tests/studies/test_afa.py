"""The afa study: its training helper, the experts' setup and the quick run end to end."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data import digits
from adaptdiff.samplers import FlowSchedule
from adaptdiff.studies import get_study
from adaptdiff.studies.afa import AFAConfig, class_subset, fit, small_dit
from adaptdiff.train import DiffusionObjective

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_fit_trains_only_the_given_parameters_and_lowers_the_loss():
    images, labels = class_subset(*digits(16, "train"), (0, 1))
    assert set(labels.tolist()) == {0, 1}
    model = small_dit(32, 1, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "y_embedder" in n}
    params = [p for n, p in model.named_parameters() if n not in frozen]
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")

    def held_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            return float(objective.loss(model, images[:128], cond={"y": labels[:128]}, generator=g))

    before = held_loss()
    fit(model, params, images, labels, 30, 3e-3, 32, seed=1)
    assert not model.training  # fit leaves the model in eval mode
    assert held_loss() < 0.8 * before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.slow  # about 20 s on 2 busy cores
def test_afa_quick_runs_every_row(tmp_path, capsys):
    assert main(["study", "afa", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert list(rows) == [
        "base (shared start)", "expert 0-4", "expert 5-9", "average weights",
        "average predictions", "AFA", "real digits",
    ]  # fmt: skip
    cfg = get_study("afa").quick(AFAConfig())
    assert rows["AFA"]["trainable"]["mean"] > 0 and rows["expert 0-4"]["trainable"]["mean"] == 0
    assert rows["AFA"]["evals"]["mean"] == 2 and rows["average weights"]["evals"]["mean"] == 1
    for name, row in rows.items():
        assert row["fd"]["mean"] > 0
        if name != "real digits":
            assert 0.0 <= row["acc"]["mean"] <= 1.0
    assert cfg.num_samples == 40
    assert (tmp_path / "afa.png").exists() and (tmp_path / "seed-0" / "samples.png").exists()
    assert "average predictions" in capsys.readouterr().out
