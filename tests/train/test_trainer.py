import math

import pytest
import torch
import torch.nn.functional as F

from adaptdiff.train import (
    BatchStream,
    CheckpointError,
    TrainConfig,
    Trainer,
    load_weights,
    update_ema,
    warmup_cosine,
)
from adaptdiff.train import checkpoint as ckpt
from tests.support.regression import mlp, mse, regression_data


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "log_every": 0, "batch_size": 16, **kw})


def full_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return mse(model, data).item()


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------


def test_loss_decreases():
    data = regression_data(n=128)
    model = mlp(hidden=32)
    before = full_loss(model, data)
    Trainer(model, mse, data, quiet(steps=150, lr=1e-2, warmup_steps=10, ema_decay=None)).fit()
    after = full_loss(model, data)
    assert after < 0.2 * before, (before, after)


def test_warmup_cosine_values():
    # warm-up over 4 steps: 1/4, 2/4, 3/4, 1; then a cosine over the remaining 8 steps
    got = [warmup_cosine(s, warmup_steps=4, total_steps=12) for s in range(13)]
    half_way = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert got[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert got[8] == pytest.approx(half_way)
    assert got[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(got[4:], got[5:], strict=False))
    assert warmup_cosine(20, 4, 12, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(8, 4, 12, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * half_way)
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)


def test_trainer_follows_the_schedule():
    lrs = []
    cfg = quiet(steps=10, lr=2e-3, min_lr=2e-4, warmup_steps=3, log_every=1)
    trainer = Trainer(mlp(), mse, regression_data(), cfg, on_log=lambda s, m: lrs.append(m["lr"]))
    trainer.fit()
    expected = [2e-3 * warmup_cosine(s, 3, 10, min_ratio=0.1) for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_grad_clip_bounds_the_global_norm():
    data = regression_data()

    def big_loss(model, batch):
        return 1e3 * mse(model, batch)

    trainer = Trainer(mlp(), big_loss, data, quiet(steps=3, grad_clip=0.5))
    for _ in range(3):
        _, pre_clip = trainer.train_step()
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer._params]))
        assert pre_clip > 0.5
        assert total <= 0.5 * (1 + 1e-5)
        assert total == pytest.approx(0.5, rel=1e-4)

    trainer = Trainer(mlp(), big_loss, data, quiet(steps=1, grad_clip=None))
    _, pre_clip = trainer.train_step()
    assert pre_clip is None
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer._params]))
    assert total > 0.5


def test_bf16_autocast_reaches_loss_fn():
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return F.mse_loss(out.float(), batch[1])

    data = regression_data(n=128)
    model = mlp(hidden=32)
    before = full_loss(model, data)
    cfg = quiet(steps=60, lr=1e-2, bf16=True, ema_decay=None)
    Trainer(model, loss_fn, data, cfg).fit()
    assert seen[0] == (True, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    assert full_loss(model, data) < 0.5 * before


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------


def test_ema_equals_hand_computed():
    model = mlp().double()
    data = tuple(t.double() for t in regression_data())
    trainer = Trainer(model, mse, data, quiet(steps=6, lr=1e-2, ema_decay=0.9, ema_start=2))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 7):
        trainer.train_step()
        decay = 0.0 if step <= 2 else 0.9
        for k, v in model.state_dict().items():
            ema[k] = decay * ema[k] + (1 - decay) * v
        torch.testing.assert_close(trainer.ema.module.state_dict(), ema, rtol=1e-13, atol=1e-15)
    assert not states_equal(trainer.ema.module.state_dict(), model.state_dict())
    assert not any(p.requires_grad for p in trainer.ema.module.parameters())


def test_update_ema_rejects_other_architecture():
    with pytest.raises(ValueError, match="parameter names"):
        update_ema(mlp(), torch.nn.Linear(8, 1), 0.9)


# ----------------------------------------------------------------------------------------------
# Data, callbacks, bad input
# ----------------------------------------------------------------------------------------------


def test_batch_stream_epochs_and_rank_slices():
    x = torch.arange(10)
    stream = BatchStream(x, batch_size=4, seed=3)
    epoch = torch.cat([stream.next(), stream.next()])  # 2 full batches, remainder 2 dropped
    assert len(set(epoch.tolist())) == 8
    ranks = [BatchStream(x, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    again = BatchStream(x, batch_size=4, seed=3)
    for _ in range(5):
        assert torch.equal(torch.cat([r.next() for r in ranks]), again.next())


def test_callbacks_fire_on_schedule():
    logs, previews = [], []

    def on_preview(step, trainer):
        previews.append(step)
        trainer.model.eval()  # the trainer puts the model back in train mode

    cfg = quiet(steps=10, log_every=4, preview_every=5)
    trainer = Trainer(
        mlp(dropout=0.5),
        mse,
        regression_data(),
        cfg,
        on_log=lambda s, m: logs.append((s, m)),
        on_preview=on_preview,
    )
    trainer.fit()
    assert [s for s, _ in logs] == [4, 8, 10]
    assert previews == [5, 10]
    assert trainer.model.training
    assert all(m["samples_per_s"] > 0 and math.isfinite(m["loss"]) for _, m in logs)
    assert logs[-1][1] == trainer.last_metrics


def test_bad_inputs():
    data = regression_data(n=32)
    with pytest.raises(ValueError, match="scalar"):
        Trainer(mlp(), lambda m, b: (m(b[0]) - b[1]) ** 2, data, quiet()).train_step()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(mlp(), mse, data, quiet(batch_size=64))
    with pytest.raises(ValueError, match="first dim"):
        Trainer(mlp(), mse, (data[0], data[1][:-1]), quiet())
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="steps"):
        Trainer(mlp(), mse, data, quiet(steps=5)).fit(steps=6)


def test_fsdp_on_cpu_raises():
    with pytest.raises(ValueError, match="fsdp=True needs CUDA"):
        Trainer(mlp(), mse, regression_data(), quiet(fsdp=True), device="cpu")


# ----------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ----------------------------------------------------------------------------------------------


def resume_config(out_dir, **kw):
    # dropout, weight decay, warm-up, clipping and an EMA all active; 40 samples / 16 per batch
    # crosses epoch boundaries (and drops remainders) between the stop and the end.
    return quiet(
        steps=12,
        lr=5e-3,
        weight_decay=0.1,
        warmup_steps=3,
        grad_clip=0.5,
        ema_decay=0.8,
        ema_start=2,
        out_dir=str(out_dir),
        **kw,
    )


def test_exact_resume_is_bit_identical(tmp_path):
    data = regression_data(n=40)
    straight = Trainer(mlp(dropout=0.3), mse, data, resume_config(tmp_path / "a"))
    straight.fit()

    first = Trainer(mlp(dropout=0.3), mse, data, resume_config(tmp_path / "b"))
    first.fit(steps=5)  # stops: checkpoint at step 5
    assert (tmp_path / "b" / "step_0000005" / "state.pt").is_file()

    torch.manual_seed(1234)  # a fresh process: other init, other RNG position
    resumed = Trainer(mlp(dropout=0.3, seed=7), mse, data, resume_config(tmp_path / "b"))
    assert resumed.resume()
    assert resumed.step == 5
    resumed.fit()

    assert resumed.step == straight.step == 12
    assert states_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert states_equal(resumed.ema.module.state_dict(), straight.ema.module.state_dict())
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(states_equal(opt_a[i], opt_b[i]) for i in opt_a)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    # the dropout stream matters: without the restored RNG the runs would differ
    assert torch.equal(torch.get_rng_state(), straight._rng_states()[0]["cpu"])


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = Trainer(mlp(), mse, regression_data(), quiet(out_dir=str(tmp_path)))
    assert not trainer.resume()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainer.resume(tmp_path / "nowhere")


def trained(tmp_path, steps=3, **kw):
    trainer = Trainer(
        mlp(), mse, regression_data(), quiet(steps=steps, out_dir=str(tmp_path), **kw)
    )
    trainer.fit()
    return trainer, tmp_path / f"step_{steps:07d}"


def fresh_trainer(tmp_path, model=None):
    model = model if model is not None else mlp(seed=5)
    trainer = Trainer(model, mse, regression_data(), quiet(steps=3, out_dir=str(tmp_path)))
    return trainer, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("model.safetensors", "truncate", "truncated"),
        ("ema.safetensors", "flip", "sha256"),
        ("state.pt", "truncate", "state.pt is truncated or corrupted"),
    ],
)
def test_damaged_checkpoint_raises(tmp_path, file, damage, message):
    _, path = trained(tmp_path)
    target = path / file
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    else:
        target.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    trainer, before = fresh_trainer(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        trainer.resume()
    assert states_equal(trainer.model.state_dict(), before)
    assert trainer.step == 0


def test_unreadable_safetensors_raises(tmp_path):
    # a file whose recorded size and hash match but which is not safetensors at all
    _, path = trained(tmp_path)
    bogus = path / "model.safetensors"
    bogus.write_bytes(b"\xff" * 64)
    state = torch.load(path / "state.pt", weights_only=True)
    state["files"]["model.safetensors"] = {"bytes": 64, "sha256": ckpt._sha256(bogus)}
    torch.save(state, path / "state.pt")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        fresh_trainer(tmp_path)[0].resume()


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: mlp(hidden=24), r"shape/dtype mismatches: 0.weight: checkpoint \[16, 8\]"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(8, 1)), "not in the model: 3.bias, 3.weight"),
        (lambda: mlp().double(), "torch.float32 vs model torch.float64"),
    ],
)
def test_mismatched_checkpoint_raises(tmp_path, other, message):
    _, path = trained(tmp_path)
    trainer, before = fresh_trainer(tmp_path, other())
    with pytest.raises(CheckpointError, match="does not match the model") as err:
        trainer.load_checkpoint(path)
    assert err.match(message)
    assert states_equal(trainer.model.state_dict(), before)
    if "float64" in message:  # an exact resume needs the dtype; loading weights may cast
        assert load_weights(other(), path).state_dict()["0.weight"].dtype == torch.float64
    else:
        with pytest.raises(CheckpointError, match="does not match the model"):
            load_weights(other(), path)


def test_load_weights_for_sampling(tmp_path):
    trainer, path = trained(tmp_path, ema_decay=0.5)
    ema = load_weights(mlp(seed=9), tmp_path)  # follows <out_dir>/latest
    assert states_equal(ema.state_dict(), trainer.ema.module.state_dict())
    weights = load_weights(mlp(seed=9), path, which="model")
    assert states_equal(weights.state_dict(), trainer.model.state_dict())
    _, no_ema = trained(tmp_path / "plain", ema_decay=None)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_weights(mlp(), no_ema)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(
        mlp(), mse, regression_data(), quiet(steps=6, ckpt_every=3, out_dir=str(tmp_path))
    )
    trainer.fit(steps=3)
    good = tmp_path / "step_0000003"
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def half_then_fail(path, obj):
        path.write_bytes(b"\x80\x02partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_torch", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        trainer.fit()  # the checkpoint at step 6 fails midway
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(good)  # overwriting the good one fails midway too
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000003"
    assert load_weights(mlp(seed=3), tmp_path, which="model").state_dict().keys() == saved.keys()
    resumed, _ = fresh_trainer(tmp_path)
    resumed.resume()
    assert resumed.step == 3
    assert states_equal(resumed.model.state_dict(), saved)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg = quiet(steps=8, ckpt_every=2, keep_last=2, out_dir=str(tmp_path))
    Trainer(mlp(), mse, regression_data(), cfg).fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000006", "step_0000008"]


def test_tied_weights_round_trip(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    trainer = Trainer(Tied(), mse, regression_data(), quiet(steps=2, out_dir=str(tmp_path)))
    trainer.fit()
    torch.manual_seed(1)
    other = load_weights(Tied(), tmp_path, which="model")
    assert other.a.weight is other.b.weight
    assert states_equal(other.state_dict(), trainer.model.state_dict())
