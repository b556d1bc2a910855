"""Training state that survives faults: a real child process SIGKILLed at every point of a
checkpoint write, failed writes (disk full, permission denied), bit-identical resume after a
kill, and NaN/Inf losses."""

from __future__ import annotations

import errno
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from adaptdiff.train import CheckpointError, Trainer
from adaptdiff.train import checkpoint as ckpt
from tests.support.launch import worker
from tests.support.regression import mlp, mse, regression_data

from .ckpt_worker import config, trainer


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start_worker(out_dir: Path, steps: int, mode: str = "fit", kill_at: str | None = None):
    args = ("tests.reliability.ckpt_worker", out_dir, steps, mode)
    return worker(*args, ADAPTDIFF_CKPT_KILL_AT=kill_at)  # None: no kill point inherited


def assert_resumes_bit_identically(out_dir: Path, straight: Trainer) -> None:
    torch.manual_seed(999)  # another RNG position than the run had
    resumed = trainer(str(out_dir))
    assert resumed.resume()
    resumed.fit()
    assert resumed.step == straight.step
    assert states_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert states_equal(resumed.ema.module.state_dict(), straight.ema.module.state_dict())


# (mode, kill point): "fit" resumes at step 2 and is killed writing the step-4 checkpoint;
# "resave" rewrites the step-2 checkpoint that latest names (a directory replaced in place).
FAULTS = [("fit", p) for p in ckpt.KILL_POINTS if p != "mid_swap"] + [
    ("resave", "mid_swap"),
    ("resave", f"during:{ckpt.STATE_FILE}"),
    ("resave", "after_swap"),
]


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_checkpoint_write(tmp_path):
    """For every fault: a run checkpoints step 2 (here), then a child process resumes it and is
    SIGKILLed at the fault's point of the next checkpoint write (the children run side by
    side). The newest checkpoint must load completely (sizes and sha256 verified) and the run
    must resume from it, in this process, to the bit-identical weights of an uninterrupted run.
    """
    straight = trainer(str(tmp_path / "straight"))
    straight.fit()
    runs = {}
    for mode, point in FAULTS:
        out = tmp_path / f"{mode}-{point.replace(':', '-')}"
        trainer(str(out)).fit(steps=2)
        runs[(mode, point)] = (out, start_worker(out, 4 if mode == "fit" else 2, mode, point))
    for (mode, point), (_out, proc) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (mode, point, proc.returncode, stderr[-2000:])
    for (mode, point), (out, _) in runs.items():
        path, model_state, ema_state, state = ckpt.load_checkpoint(out)
        expected = 4 if (mode, point) == ("fit", "done") else 2
        assert state["step"] == expected and path.name == f"step_{expected:07d}", (mode, point)
        assert ema_state is not None and model_state.keys() == ema_state.keys()
        assert_resumes_bit_identically(out, straight)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], (mode, point)


def _fail_with(code: int):
    def write_stream(path, write):
        with open(path, "wb") as f:  # part of the file lands, then the device refuses
            f.write(b"partial")
        raise OSError(code, os.strerror(code), str(path))

    return write_stream


@pytest.mark.parametrize(
    "code, name", [(errno.ENOSPC, "ENOSPC"), (errno.EACCES, "EACCES"), (errno.EIO, "EIO")]
)
@pytest.mark.parametrize("which", ["weights", "state", "latest"])
def test_failed_write_raises_clearly_and_keeps_the_previous(
    tmp_path, monkeypatch, code, name, which
):
    t = Trainer(mlp(), mse, regression_data(), config(str(tmp_path)))
    t.fit(steps=2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    real = ckpt._write_stream
    target = {"weights": ckpt.MODEL_FILE, "state": ckpt.STATE_FILE, "latest": "latest"}[which]

    def write_stream(path, write):
        if target in path.name:
            return _fail_with(code)(path, write)
        return real(path, write)

    monkeypatch.setattr(ckpt, "_write_stream", write_stream)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint .*{name}") as info:
        t.fit(steps=4)
    assert isinstance(info.value, OSError)  # handlers of the cause still catch it
    assert "previous checkpoint is kept" in str(info.value)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() in ("step_0000002", "step_0000004")
    _, model_state, _, state = ckpt.load_checkpoint(tmp_path)
    if which != "latest":  # the new directory never appeared
        assert state["step"] == 2 and states_equal(model_state, before)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000002"]


def test_failed_write_over_an_existing_checkpoint_puts_it_back(tmp_path, monkeypatch):
    t = Trainer(mlp(), mse, regression_data(), config(str(tmp_path)))
    t.fit(steps=2)
    monkeypatch.setattr(ckpt, "_write_stream", _fail_with(errno.ENOSPC))
    with pytest.raises(CheckpointError, match="ENOSPC"):
        t.save_checkpoint(tmp_path / "step_0000002")
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path)[3]["step"] == 2


# ------------------------------------------------------------------------------ NaN / Inf


def poisoned_loss(bad_steps: set[int], value: float):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * value if calls["n"] in bad_steps else loss

    return loss_fn


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_before_the_weights_change(value):
    t = Trainer(mlp(), poisoned_loss({3}, value), regression_data(), config(None, every=0))
    t.fit(steps=2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3.*nonfinite='skip'"):
        t.fit()
    assert states_equal(t.model.state_dict(), before)


def test_nonfinite_gradient_is_caught_too():
    def loss_fn(model, batch):  # finite loss, infinite gradient (sqrt at 0)
        return (
            mse(model, batch)
            + (model[0].weight * 0).abs().sqrt().sum() * 0
            + torch.sqrt(model[0].weight[0, 0] * 0)
        )

    t = Trainer(mlp(), loss_fn, regression_data(), config(None, every=0))
    with pytest.raises(FloatingPointError, match="grad norm"):
        t.fit(steps=1)


def test_nonfinite_skip_counts_and_leaves_the_update_out(tmp_path):
    """nonfinite="skip": a poisoned step leaves the weights as they were (the step, LR schedule
    and data still advance); the counter counts, is logged and survives a checkpoint."""
    cfg = config(str(tmp_path), every=0)
    cfg.nonfinite, cfg.log_every = "skip", 4
    skipping = Trainer(mlp(), poisoned_loss({2, 5}, float("nan")), regression_data(), cfg)
    skipping.fit(steps=1)
    before = {k: v.clone() for k, v in skipping.model.state_dict().items()}
    skipping.fit(steps=2)  # step 2 is poisoned: skipped
    assert states_equal(skipping.model.state_dict(), before)
    skipping.fit()
    assert skipping.nonfinite_steps == 2 and skipping.step == 8
    assert all(torch.isfinite(p).all() for p in skipping.model.parameters())
    assert skipping.last_metrics["nonfinite_steps"] == 2.0
    assert math.isfinite(skipping.last_metrics["loss"])
    again = Trainer(mlp(), mse, regression_data(), config(str(tmp_path), every=0))
    again.resume()
    assert again.nonfinite_steps == 2
