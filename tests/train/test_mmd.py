import pytest
import torch

from adaptdiff.samplers import VPSchedule, sample
from adaptdiff.train.mmd import MMDConfig, ddim_chain, finetune_mmd, mmd2_unbiased


def linear_kernel(a, b):
    return a @ b.T


def test_unbiased_estimator_on_known_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.5, -0.25, 0.0])
    same, shifted = [], []
    for _ in range(2000):
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        y = torch.randn(6, 3, generator=g, dtype=torch.float64)
        same.append(mmd2_unbiased(x, y, linear_kernel))
        shifted.append(mmd2_unbiased(x + mu, y, linear_kernel))
    # E[MMD²_u] with the linear kernel is |mu_x - mu_y|² exactly (0 for equal laws); the
    # biased (V-statistic) estimator would add (tr Σx / m + tr Σy / n) = 1.
    assert abs(torch.stack(same).mean()) < 0.05
    assert torch.stack(shifted).mean() == pytest.approx(float(mu.square().sum()), abs=0.05)


def test_cubic_kernel_mmd_is_differentiable_and_positive_for_different_laws():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, requires_grad=True)
    y = torch.randn(64, 8, generator=g) + 1.0
    loss = mmd2_unbiased(x, y)
    loss.backward()
    assert loss > 0 and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2_unbiased(x[:1], y)


def test_ddim_chain_matches_the_sampler_and_checkpointing_keeps_gradients(tiny_dit):
    model, schedule = tiny_dit(perturb=0.05, learn_sigma=False), VPSchedule()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = schedule.timesteps(4)
    y = torch.tensor([1, 2])
    kw = dict(cond={"y": y}, uncond={"y": torch.full_like(y, 10)}, guidance_scale=2.0)
    ref = sample(model, noise, method="ddim", timesteps=ts, prediction="eps", progress=False, **kw)
    with torch.no_grad():
        out = ddim_chain(model, noise, ts, schedule, prediction="eps", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = []
    for ckpt in (True, False):
        model.zero_grad()
        x = ddim_chain(model, noise, ts, schedule, prediction="eps", checkpointing=ckpt, **kw)
        x.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_finetune_runs_and_moves_the_weights(tiny_dit):
    model, schedule = tiny_dit(perturb=0.05, learn_sigma=False), VPSchedule()
    real = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = MMDConfig(steps=3, k=2, batch_size=8, lr=1e-3, log_every=0)
    losses = finetune_mmd(
        model, real, lambda x: x.flatten(1)[:, :32], cfg, schedule=schedule, prediction="eps",
        num_classes=10, null_label=10, log=None,
    )  # fmt: skip
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False))
