"""DiffusionObjective (adaptdiff.train.objectives) over the VP and flow schedules it trains with."""

import pytest
import torch

from adaptdiff.samplers import FlowSchedule, VPSchedule
from adaptdiff.samplers.parameterization import target
from adaptdiff.train import DiffusionObjective


class TinyLinear(torch.nn.Module):
    """x_t [B, D] and a time feature -> a prediction [B, D] (or [B, 2D] with learned sigma)."""

    def __init__(self, dim=4, t_scale=1.0, out_mult=1):
        super().__init__()
        self.lin = torch.nn.Linear(dim + 1, out_mult * dim)
        self.t_scale = t_scale

    def forward(self, x, t, shift=None):
        out = self.lin(torch.cat([x, (t / self.t_scale)[:, None]], 1))
        return out if shift is None else out + shift


def _data(n=256, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.5 + 0.3 * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize(
    ("schedule", "prediction", "weighting"),
    [
        (VPSchedule(), "eps", None),
        (VPSchedule("cosine"), "v", None),
        (VPSchedule(), "eps", "min_snr"),
        (FlowSchedule(), "flow", None),
        (FlowSchedule(t_sampling="logit_normal"), "flow", lambda a, s, t: 1 + t),
    ],
)
def test_loss_is_finite_and_decreases(schedule, prediction, weighting):
    torch.manual_seed(0)
    model = TinyLinear(t_scale=schedule.t_max)
    objective = DiffusionObjective(schedule, prediction, loss_weighting=weighting)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    x0 = _data()

    def eval_loss():  # the same t and noise every time, so losses compare
        with torch.no_grad():
            return objective.loss(model, x0, generator=torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        loss = objective.loss(model, x0, generator=g)
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before


def test_loss_matches_its_definition():
    schedule, x0 = VPSchedule("cosine"), _data(8)
    model = TinyLinear(t_scale=999.0)
    loss = DiffusionObjective(schedule, "v").loss(
        model, x0, generator=torch.Generator().manual_seed(5)
    )
    # Replay the draws: t first, then the noise, from the same generator.
    g = torch.Generator().manual_seed(5)
    t = schedule.sample_t(8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    expected = (model(x_t, t) - target(x0, eps, alpha, sigma, "v")).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_cond_is_passed_and_learned_sigma_half_is_ignored():
    x0 = _data(8)
    objective = DiffusionObjective(FlowSchedule(), "flow")
    model = TinyLinear(out_mult=2)
    shift = torch.zeros(8, 8)
    base = objective.loss(
        model, x0, cond={"shift": shift}, generator=torch.Generator().manual_seed(0)
    )
    shift[:, 4:] = 100.0  # the variance half: no effect
    same = objective.loss(
        model, x0, cond={"shift": shift}, generator=torch.Generator().manual_seed(0)
    )
    shift[:, :4] = 1.0
    moved = objective.loss(
        model, x0, cond={"shift": shift}, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(base, same) and not torch.equal(base, moved)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionObjective(VPSchedule(), "score")
    with pytest.raises(ValueError, match="loss_weighting"):
        DiffusionObjective(VPSchedule(), "eps", loss_weighting="p2")
    with pytest.raises(ValueError, match="loss_weighting"):
        DiffusionObjective(FlowSchedule(), "flow", loss_weighting="min_snr")
    with pytest.raises(ValueError, match="model output"):
        DiffusionObjective(VPSchedule()).loss(lambda x, t: x[:, :2], _data(4))
