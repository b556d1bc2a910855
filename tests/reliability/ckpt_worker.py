"""Child process of the checkpoint fault tests: resume the tiny run in ``out_dir`` (if any),
train to ``steps`` with a checkpoint every ``every`` steps, or with ``resave`` write the
checkpoint it resumed from again (replacing a directory). ``ADAPTDIFF_CKPT_KILL_AT`` kills it
mid-write. Prints ``done <step>`` on success."""

import sys

import torch

from adaptdiff.train import TrainConfig, Trainer
from tests.support.regression import mlp, mse, regression_data


def config(out_dir: str, every: int = 2) -> TrainConfig:
    # dropout, weight decay, warm-up, clipping and an EMA: every piece of state matters.
    return TrainConfig(
        steps=8,
        batch_size=16,
        lr=5e-3,
        weight_decay=0.1,
        warmup_steps=2,
        grad_clip=0.5,
        ema_decay=0.8,
        ema_start=1,
        ckpt_every=every,
        keep_last=2,
        log_every=0,
        progress=False,
        out_dir=out_dir,
    )


def trainer(out_dir: str, every: int = 2) -> Trainer:
    return Trainer(mlp(dropout=0.3), mse, regression_data(n=40), config(out_dir, every))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    t = trainer(out_dir)
    t.resume()
    if mode == "resave":
        t.save_checkpoint()  # the path it resumed from: replaced
    else:
        t.fit(steps=steps)
    print(f"done {t.step}", flush=True)
