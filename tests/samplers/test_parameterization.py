import pytest
import torch

from adaptdiff.samplers import FlowSchedule, VPSchedule, convert, target, to_x0_eps
from adaptdiff.samplers.parameterization import PREDICTIONS, eps_to_x0, x0_to_eps

SCHEDULES = [VPSchedule("linear"), VPSchedule("cosine"), FlowSchedule()]


def _batch(schedule, b=5):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, 3, 4, 4, generator=g)
    eps = torch.randn(b, 3, 4, 4, generator=g)
    # Interior times: away from alpha = 0 and sigma = 0, where some conversions divide by zero.
    t = torch.linspace(0.1, 0.9, b) * schedule.t_max
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    return x0, eps, alpha, sigma, x_t


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_target_round_trips_to_x0_eps(schedule, prediction):
    x0, eps, alpha, sigma, x_t = _batch(schedule)
    pred = target(x0, eps, alpha, sigma, prediction)
    x0_back, eps_back = to_x0_eps(pred, x_t, alpha, sigma, prediction)
    torch.testing.assert_close(x0_back, x0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("dest", PREDICTIONS)
def test_convert_between_all_pairs(source, dest):
    x0, eps, alpha, sigma, x_t = _batch(VPSchedule("cosine"))
    got = convert(target(x0, eps, alpha, sigma, source), x_t, alpha, sigma, source, dest)
    torch.testing.assert_close(got, target(x0, eps, alpha, sigma, dest), atol=5e-5, rtol=1e-4)


def test_target_definitions():
    x0, eps = torch.tensor([2.0]), torch.tensor([-1.0])
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    assert target(x0, eps, alpha, sigma, "v").item() == pytest.approx(0.6 * -1 - 0.8 * 2)
    assert target(x0, eps, alpha, sigma, "flow").item() == -3.0
    assert target(x0, eps, alpha, sigma, "eps").item() == -1.0
    assert target(x0, eps, alpha, sigma, "x0").item() == 2.0


def test_flow_velocity_is_dx_dt():
    x0, eps = torch.randn(4), torch.randn(4)
    t, dt = 0.3, 1e-3
    x = (1 - t) * x0 + t * eps
    x_later = (1 - t - dt) * x0 + (t + dt) * eps
    u = target(x0, eps, 1 - t, t, "flow")
    torch.testing.assert_close((x_later - x) / dt, u, atol=1e-3, rtol=1e-3)


def test_helpers_and_scalar_scales():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    alpha, sigma = 0.6, 0.8
    x_t = alpha * x0 + sigma * eps
    torch.testing.assert_close(eps_to_x0(eps, x_t, alpha, sigma), x0)
    torch.testing.assert_close(x0_to_eps(x0, x_t, alpha, sigma), eps)


def test_unknown_prediction_raises():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="prediction"):
        to_x0_eps(x, x, 1.0, 1.0, "score")
    with pytest.raises(ValueError, match="prediction"):
        target(x, x, 1.0, 1.0, "epsilon")
