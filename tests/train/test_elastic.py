"""Elastic restarts: under ``torchrun --max-restarts=1`` one of 2 gloo processes is SIGKILLed
mid-run, torchrun brings the group back, and the Trainer resumes from the last complete
checkpoint. The final weights equal an uninterrupted run's bit for bit, and the step log shows
every step after the resume point exactly once, with the losses of the first attempt.

The launches run side by side in one fixture (about a minute on 2 cores); each torchrun may
take up to 10 minutes on a loaded machine before the test fails."""

from pathlib import Path

import pytest
import torch

from adaptdiff.train import trainer as trainer_module
from tests.support.launch import torchrun_start, torchrun_wait

from .elastic_worker import CKPT_EVERY, STEPS

WORKER = "tests.train.elastic_worker"
ELASTIC = ("--standalone", "--max-restarts=1")
# name: (ELASTIC_KILL, steps the first attempt completes, the last complete checkpoint)
KILLS = {
    "rank1_mid_step": ("1:6", 5, 3),  # rank 1 dies as step 6 starts
    "rank0_mid_checkpoint": ("0:6:during:model.safetensors", 6, 3),  # half-way through step 6's
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    for name in ["straight", *KILLS, "split"]:
        (out / name).mkdir()
    procs = {"straight": torchrun_start(WORKER, out / "straight", "train", options=ELASTIC)}
    for name, (kill, _, _) in KILLS.items():
        procs[name] = torchrun_start(
            WORKER, out / name, "train", options=ELASTIC, ELASTIC_KILL=kill
        )
    procs["split"] = torchrun_start(WORKER, out / "split", "split")
    try:
        for name, proc in procs.items():
            (out / name / "torchrun.log").write_text(torchrun_wait(proc, timeout=600))
    finally:  # a failed launch fails the test; stop the others rather than leave them running
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.communicate(timeout=60)
    return out


def step_log(run: Path) -> list[list[tuple[int, str]]]:
    """Rank 0's log: per attempt, [(step, loss as float.hex), ...]."""
    attempts: list[list[tuple[int, str]]] = []
    for line in (run / "steps.log").read_text().splitlines():
        if line == "start":
            attempts.append([])
        else:
            step, loss = line.split()
            attempts[-1].append((int(step), loss))
    return attempts


@pytest.mark.slow
@pytest.mark.parametrize("name", KILLS)
def test_killed_rank_restarts_and_resumes_exactly(runs, name):
    straight = torch.load(runs / "straight" / "result.pt", weights_only=True)
    result = torch.load(runs / name / "result.pt", weights_only=True)
    assert result["step"] == straight["step"] == STEPS
    for which in ("model", "ema"):
        assert result[which].keys() == straight[which].keys()
        for key, value in straight[which].items():
            assert torch.equal(result[which][key], value), (which, key)

    (reference,) = step_log(runs / "straight")  # one attempt
    reference = dict(reference)
    log = step_log(runs / name)
    assert len(log) == 2  # the group was brought back once
    _, completed, resumed_at = KILLS[name]
    assert [step for step, _ in log[0]] == list(range(1, completed + 1))
    # after the resume point every step runs once, the redone ones included
    assert [step for step, _ in log[1]] == list(range(resumed_at + 1, STEPS + 1))
    assert resumed_at < completed  # some steps were lost with the killed attempt, and redone
    for attempt in log:
        for step, loss in attempt:
            assert loss == reference[step], (step, loss, reference[step])

    names = sorted(p.name for p in (runs / name / "ckpt").iterdir())
    assert names == ["latest", f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]  # no debris left


@pytest.mark.slow
def test_ranks_reading_different_checkpoints_refuse_to_resume(runs):
    for rank in (0, 1):
        message = (runs / "split" / f"resume_error_rank{rank}.txt").read_text()
        assert f"resumed at different steps [{CKPT_EVERY}, 0]" in message
        assert "shared filesystem" in message


def test_multinode_restarts_on_a_shared_store_are_refused(monkeypatch):
    for name, value in {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "GROUP_WORLD_SIZE": "2",
        "TORCHELASTIC_MAX_RESTARTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        trainer_module._init_process_group("gloo", 0, 2)
