"""The diffscaler study: its tasks, the per-task router of the baselines and the quick run."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.studies.diffscaler import TASKS, _PerTask
from tests.adapters.support import inputs, noisy_dit


def test_tasks_are_invertible_styles():
    x = torch.randn(3, 1, 16, 16)
    for name, (forward, inverse) in TASKS.items():
        styled = forward(x)
        assert not torch.equal(styled, x), name
        torch.testing.assert_close(inverse(styled), x, rtol=0, atol=0)


def test_per_task_router_sends_each_row_to_its_model():
    models = [noisy_dit(seed=s).eval() for s in (1, 2)]
    x, t, y = inputs(b=4)
    task = torch.tensor([1, 0, 0, 1])
    out = _PerTask(models)(x, t, y, task=task)
    for i, k in enumerate(task.tolist()):
        torch.testing.assert_close(out[i], models[k](x[i : i + 1], t[i : i + 1], y[i : i + 1])[0])


@pytest.mark.slow  # about 25 s on 2 busy cores
def test_diffscaler_quick_runs_every_method(tmp_path, capsys):
    assert main(["study", "diffscaler", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert list(rows) == ["frozen base", "Diffscaler", "LoRA", "DiffFit", "real digits"]
    params = {name: rows[name]["trainable"]["mean"] for name in ("Diffscaler", "LoRA")}
    assert 0.7 < params["LoRA"] / params["Diffscaler"] < 1.3  # about equal parameters
    assert rows["frozen base"]["trainable"]["mean"] == 0
    for name in ("Diffscaler", "LoRA", "DiffFit"):
        row = rows[name]
        assert all(row[f"fd_{t}"]["mean"] > 0 for t in TASKS)
        assert row["fd"]["mean"] == pytest.approx(sum(row[f"fd_{t}"]["mean"] for t in TASKS) / 3)
    assert (tmp_path / "diffscaler.png").exists()
    assert "Diffscaler" in capsys.readouterr().out
