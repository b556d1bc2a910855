"""Trains a tiny residual MLP under ``torchrun --max-restarts``; test_elastic.py launches it with
2 CPU processes (DDP over gloo) and kills one rank in the first attempt.

``ELASTIC_KILL=<rank>:<step>`` SIGKILLs that rank as it starts that step (once: a marker file
records it); ``ELASTIC_KILL=<rank>:<step>:<point>`` instead arms the checkpoint kill point
``<point>`` (``ADAPTDIFF_CKPT_KILL_AT``) on that rank at that step, so the next checkpoint write
dies there. Every attempt resumes from ``<out>/ckpt`` as a user's script would. Rank 0 writes
``start`` to ``steps.log`` as each attempt begins, then ``<step> <loss as float.hex>`` after each
completed step (``on_log`` with ``log_every=1``); the final weights go to ``result.pt``. Mode
``split`` checks that ranks reading different checkpoint folders refuse to resume."""

import os
import signal
import sys
from pathlib import Path

import torch

from adaptdiff.train import CheckpointError, TrainConfig, Trainer
from tests.support.regression import ResMLP, mse, regression_data

STEPS = 10
CKPT_EVERY = 3


def make_trainer(out_dir: Path, loss_fn=mse, on_log=None) -> Trainer:
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=16,
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        grad_clip=0.5,
        ema_decay=0.9,
        log_every=1,
        ckpt_every=CKPT_EVERY,
        keep_last=2,
        progress=False,
        out_dir=str(out_dir),
    )
    return Trainer(ResMLP(), loss_fn, regression_data(n=48), cfg, on_log=on_log, device="cpu")


class KillingLoss:
    """``mse``, except that it kills this rank (or arms a checkpoint kill point) once, as the
    step named by ``ELASTIC_KILL`` starts on the rank it names."""

    def __init__(self, marker: Path) -> None:
        kill = os.environ.get("ELASTIC_KILL", "")
        self.kill = kill.split(":", 2) if kill else None
        self.marker = marker  # the kill happens in the first attempt only
        self.rank, self.step = int(os.environ.get("RANK", "0")), 0

    def __call__(self, model, batch):
        self.step += 1
        if self.kill and (int(self.kill[0]), int(self.kill[1])) == (self.rank, self.step):
            if not self.marker.exists():
                self.marker.touch()
                if len(self.kill) == 3:
                    os.environ["ADAPTDIFF_CKPT_KILL_AT"] = self.kill[2]
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
        return mse(model, batch)


def train(out: Path) -> None:
    def on_log(step: int, metrics: dict[str, float]) -> None:
        with open(out / "steps.log", "a") as f:
            f.write(f"{step} {metrics['loss'].hex()}\n")

    loss_fn = KillingLoss(out / "killed")
    trainer = make_trainer(out / "ckpt", loss_fn, on_log)
    try:
        if trainer.is_main:
            with open(out / "steps.log", "a") as f:
                f.write("start\n")
        trainer.resume()  # what a user's script does first, so that a restart continues the run
        loss_fn.step = trainer.step
        trainer.fit()
        if trainer.is_main:
            result = {"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()}
            torch.save(dict(result, step=trainer.step), out / "result.pt")
    finally:
        trainer.close()


def split(out: Path) -> None:
    """Each rank gets its own out_dir (nodes without a shared filesystem): rank 0 finds the
    checkpoint it wrote, rank 1 finds none; resume must fail on both ranks."""
    rank = int(os.environ["RANK"])
    first = make_trainer(out / f"ckpt_rank{rank}")
    try:
        first.fit(steps=CKPT_EVERY)  # only rank 0 writes, into its own folder
        try:
            make_trainer(out / f"ckpt_rank{rank}").resume()
        except CheckpointError as e:
            (out / f"resume_error_rank{rank}.txt").write_text(str(e))
    finally:
        first.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"train": train, "split": split}[sys.argv[2]](Path(sys.argv[1]))
