"""Trains the tiny regression MLP; test_ddp.py runs it under torchrun with 2 CPU processes and
compares with the same run in one process. The DDP run stops at step 4 and resumes, so the
per-rank RNG gathering and DDP resume are exercised too."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adaptdiff.train import TrainConfig, Trainer  # noqa: E402
from tests.train.tiny import mlp, mse, regression_data  # noqa: E402

STEPS = 8


def make_trainer(out_dir: str, loss_fn=mse) -> Trainer:
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=16,
        lr=1e-2,
        weight_decay=0.1,
        warmup_steps=2,
        grad_clip=0.5,
        ema_decay=0.9,
        log_every=4,
        progress=False,
        out_dir=out_dir,
    )
    return Trainer(mlp(hidden=16), loss_fn, regression_data(n=48), cfg, device="cpu")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    local_sizes = set()

    def loss_fn(model, batch):
        local_sizes.add(len(batch[0]))
        return mse(model, batch)

    first = make_trainer(str(out / "ckpt"), loss_fn)
    first.fit(steps=STEPS // 2)
    resumed = make_trainer(str(out / "ckpt"), loss_fn)
    assert resumed.resume() and resumed.step == STEPS // 2
    resumed.fit()
    if resumed.is_main:
        result = {
            "model": resumed.model.state_dict(),
            "ema": resumed.ema.module.state_dict(),
            "world_size": resumed.world_size,
            "loss": resumed.last_metrics["loss"],
            "local_batch_sizes": sorted(local_sizes),
        }
        torch.save(result, out / "result.pt")
    first.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
