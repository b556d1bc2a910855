"""The control study: its fidelity measure, its sources, the shared base, and the quick run."""

import json

import pytest
import torch

from adaptdiff.cli import main
from adaptdiff.data.conditions import CONDITIONS, condition
from adaptdiff.studies import get_study
from adaptdiff.studies.control import ControlConfig, agreement, base_model, sources

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_agreement_is_one_for_the_source_and_low_for_other_digits(name):
    src, labels = sources(20)
    control = condition(name, src)
    assert agreement(name, src, control) == pytest.approx(1.0, abs=1e-5)
    shuffled = src[torch.roll(torch.arange(20), 1)]  # each condition against another digit
    assert agreement(name, shuffled, control) < 0.9


def test_inpaint_agreement_reads_only_the_kept_half():
    src, _ = sources(10)
    control = condition("inpaint", src)
    changed = src.clone()
    changed[..., 8:] = torch.rand_like(changed[..., 8:])  # the hidden half is free
    assert agreement("inpaint", changed, control) == pytest.approx(1.0, abs=1e-5)
    changed[..., :8] = -changed[..., :8]
    assert agreement("inpaint", changed, control) < 0


def test_sources_are_held_out_and_balanced():
    src, labels = sources(25)
    assert src.shape == (25, 1, 16, 16)
    assert labels.tolist() == [i % 10 for i in range(25)]


def test_base_is_trained_once_and_shared_by_the_seeds(tmp_path):
    cfg = get_study("control").quick(ControlConfig())
    cfg = type(cfg)(**{**cfg.__dict__, "base_steps": 3})
    a = base_model(cfg, tmp_path / "seed-0")
    files = list(tmp_path.glob("base-*.pt"))
    assert len(files) == 1
    b = base_model(cfg, tmp_path / "seed-1")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert not any(p.requires_grad for p in b.parameters())


@pytest.mark.slow  # about 20 s idle, 50 s on 2 busy cores
def test_control_quick_runs_every_condition(tmp_path, capsys):
    assert main(["study", "control", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert list(rows) == [f"{c}: {m}" for c in CONDITIONS for m in ("base", "controlnet")]
    for name, row in rows.items():
        assert 0.0 <= row["acc"]["mean"] <= 1.0 and -1.0 <= row["agree"]["mean"] <= 1.0
        assert row["fd"]["mean"] >= 0
        assert ("trainable" in row) == name.endswith("controlnet")
    assert (tmp_path / "control.png").exists() and (tmp_path / "seed-0" / "samples.png").exists()
    assert "edges: controlnet" in capsys.readouterr().out
