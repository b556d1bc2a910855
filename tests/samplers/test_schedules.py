import math

import pytest
import torch

from adaptdiff.samplers import FlowSchedule, VPSchedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "cosine"])
def test_vp_alpha_sigma_on_the_grid(beta_schedule):
    sched = VPSchedule(beta_schedule)
    t = torch.arange(1000, dtype=torch.float32)
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.dtype == sigma.dtype == torch.float32 and alpha.shape == t.shape
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000), atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha.double() ** 2, sched.alphas_cumprod, atol=1e-6, rtol=1e-5)
    assert bool((alpha[1:] < alpha[:-1]).all()), "alpha must fall with t"


def test_vp_linear_matches_ddpm_betas():
    sched = VPSchedule("linear")
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_0 = 1 - beta_0, the first noisy step of the chain.
    assert sched.alpha_sigma(torch.tensor(0.0))[1].item() == pytest.approx(0.01, rel=1e-4)


def test_vp_clean_end_and_clamping():
    sched = VPSchedule()
    alpha, sigma = sched.alpha_sigma(torch.tensor([-1.0, -5.0]))
    assert alpha.tolist() == [1.0, 1.0] and sigma.tolist() == [0.0, 0.0]
    top = sched.alpha_sigma(torch.tensor(999.0))
    beyond = sched.alpha_sigma(torch.tensor(1500.0))
    assert top[0].item() == beyond[0].item()


def test_vp_fractional_t_interpolates_log_alpha_bar():
    sched = VPSchedule("cosine")
    lo, hi = sched.alpha_sigma(torch.tensor(400.0)), sched.alpha_sigma(torch.tensor(401.0))
    mid = sched.alpha_sigma(torch.tensor(400.25))
    expected = 0.75 * math.log(lo[0].item() ** 2) + 0.25 * math.log(hi[0].item() ** 2)
    assert math.log(mid[0].item() ** 2) == pytest.approx(expected, rel=1e-5)
    assert mid[0].item() ** 2 + mid[1].item() ** 2 == pytest.approx(1.0, abs=1e-6)
    # Between t = -1 (clean) and t = 0 too.
    half = sched.alpha_sigma(torch.tensor(-0.5))
    assert 0 < half[1].item() < sched.alpha_sigma(torch.tensor(0.0))[1].item()


def test_vp_alpha_sigma_keeps_shape():
    alpha, sigma = VPSchedule().alpha_sigma(torch.rand(2, 3) * 999)
    assert alpha.shape == sigma.shape == (2, 3)


def test_vp_timesteps_spacings_match_diffusers():
    # Values as listed by Lin et al. (2024), table 2, for T = 1000 and 10 steps.
    sched = VPSchedule()
    trailing = sched.timesteps(10, "trailing")
    assert trailing.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1]
    leading = sched.timesteps(10, "leading")
    assert leading.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    linspace = sched.timesteps(10, "linspace")
    assert linspace.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0, -1]
    assert sched.timesteps(3).tolist() == [999, 666, 332, -1]
    full = sched.timesteps(1000)
    assert full.tolist() == list(range(999, -2, -1))


def test_vp_sample_t_reproducible_integers():
    sched = VPSchedule(num_train_timesteps=50)
    a = sched.sample_t(1000, generator=torch.Generator().manual_seed(3))
    b = sched.sample_t(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 49 and torch.equal(a, a.round())
    assert len(a.unique()) == 50


def test_flow_alpha_sigma_and_timesteps():
    sched = FlowSchedule()
    t = torch.tensor([0.0, 0.25, 1.0])
    alpha, sigma = sched.alpha_sigma(t)
    assert alpha.tolist() == [1.0, 0.75, 0.0] and sigma.tolist() == t.tolist()
    assert sched.timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_flow_shift():
    ts = FlowSchedule(shift=3.0).timesteps(4)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(ts, 3 * t / (1 + 2 * t))
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert ts[2].item() == pytest.approx(0.75)  # shift > 1 spends more steps at high noise


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_sample_t(t_sampling):
    sched = FlowSchedule(t_sampling=t_sampling)
    t = sched.sample_t(4000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.min() > 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.02)
    # logit-normal concentrates near the middle: smaller spread than uniform's 1/sqrt(12).
    spread = t.std().item()
    assert (spread < 0.25) == (t_sampling == "logit_normal")


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: VPSchedule("quadratic"), "beta_schedule"),
        (lambda: VPSchedule(num_train_timesteps=1), "num_train_timesteps"),
        (lambda: VPSchedule().timesteps(10, "uniform"), "spacing"),
        (lambda: VPSchedule().timesteps(0), "steps"),
        (lambda: VPSchedule().timesteps(1001), "steps"),
        (lambda: FlowSchedule(shift=0.0), "shift"),
        (lambda: FlowSchedule(t_sampling="beta"), "t_sampling"),
        (lambda: FlowSchedule().timesteps(0), "steps"),
    ],
)
def test_bad_arguments(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
