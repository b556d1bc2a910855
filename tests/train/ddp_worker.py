"""Trains a tiny residual MLP; test_ddp.py runs it under torchrun with 2 CPU processes (DDP, then
FSDP2 over gloo) and compares each with the same run in one process. Each distributed run stops
at step 4 and resumes, so per-rank RNG gathering and distributed resume are exercised too."""

import sys
from pathlib import Path

import torch

from adaptdiff.train import TrainConfig, Trainer
from adaptdiff.train import trainer as trainer_module
from tests.support.regression import ResMLP, mse, regression_data

STEPS = 8


def make_trainer(out_dir: str, loss_fn=mse, fsdp: bool = False) -> Trainer:
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
        fsdp=fsdp,
    )
    return Trainer(ResMLP(), loss_fn, regression_data(n=48), cfg, device="cpu")


def run(out: Path, fsdp: bool) -> Trainer:
    local_sizes = set()

    def loss_fn(model, batch):
        local_sizes.add(len(batch[0]))
        return mse(model, batch)

    first = make_trainer(str(out), loss_fn, fsdp)
    first.fit(steps=STEPS // 2)
    resumed = make_trainer(str(out), loss_fn, fsdp)
    assert resumed.resume() and resumed.step == STEPS // 2
    resumed.fit()
    model_state = resumed._model_state(resumed.model)  # collective under FSDP
    ema_state = resumed._model_state(resumed.ema.module)
    if resumed.is_main:
        result = {
            "model": model_state,
            "ema": ema_state,
            "world_size": resumed.world_size,
            "loss": resumed.last_metrics["loss"],
            "local_batch_sizes": sorted(local_sizes),
            "sharded": any(hasattr(p, "full_tensor") for p in resumed.model.parameters()),
        }
        torch.save(result, out / "result.pt")
    return first


def main(out: Path) -> None:
    torch.set_num_threads(1)
    owner = run(out / "ddp", fsdp=False)  # creates the process group
    trainer_module._FSDP_ON_CPU_FOR_TESTS = True
    run(out / "fsdp", fsdp=True)
    owner.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
