import pytest
import torch

from adaptdiff.samplers import (
    SAMPLERS,
    FlowSchedule,
    VPSchedule,
    denoiser,
    sample,
    sample_ddim,
    sample_ddpm,
)

from .support import GaussianModel

MU, S = torch.tensor([0.5, -1.0]), torch.tensor([0.5, 2.0])
CASES = [  # (prediction, schedule)
    ("eps", VPSchedule("linear")),
    ("v", VPSchedule("cosine")),
    ("flow", FlowSchedule()),
    ("flow", FlowSchedule(shift=3.0)),
]
DETERMINISTIC = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2}  # method: order


def _standard_noise(n=2048, seed=0):
    """N(0, I) noise standardised per channel, so sample statistics carry no sampling error."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return (z - z.mean(0)) / z.std(0)


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize(("prediction", "schedule"), CASES, ids=lambda c: repr(c))
def test_deterministic_samplers_recover_gaussian_data(method, prediction, schedule):
    noise = _standard_noise()
    errors, stats = [], []
    for steps in (10, 40):
        model = GaussianModel(schedule, MU, S, prediction)
        out, info = sample(
            model, noise, method=method, steps=steps, prediction=prediction, schedule=schedule,
            progress=False, return_info=True,
        )  # fmt: skip
        # For Gaussian data the probability-flow ODE is an affine map: the exact answer.
        exact = model.ode_solution(noise, info["timesteps"][0])
        errors.append((out - exact).abs().max().item())
        stats.append(
            max((out.mean(0) - MU).abs().max().item(), (out.std(0) - S).abs().max().item())
        )
        assert info["nfe"] == model.calls == (2 * steps - 1 if method == "heun" else steps)
    # Error shrinks with the steps, faster for the second-order methods.
    order = DETERMINISTIC[method]
    assert errors[1] < errors[0] / (3 if order == 1 else 6)
    # Mean and std within a tolerance that tightens with steps: O(1/steps) or O(1/steps^2), plus
    # a floor for VP, which starts from N(0, I) although alpha_T > 0 (a bias of about alpha_T mu).
    for steps, stat in zip((10, 40), stats, strict=True):
        assert stat < (3.2 / steps if order == 1 else 0.01 + 14 / steps**2), steps


def test_ddim_eta1_with_all_training_steps_is_ddpm():
    schedule = VPSchedule()
    model = GaussianModel(schedule, MU, S, "eps")
    noise = torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    ddpm = sample(
        model, noise, method="ddpm", steps=1000, progress=False,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    ddim = sample(
        model, noise, method="ddim", steps=1000, eta=1.0, progress=False,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    # Same posterior, same noise draws: the same samples up to rounding.
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)
    # And DDPM's marginals are the data's: 4 standard errors.
    n = noise.shape[0]
    assert ((ddpm.mean(0) - MU).abs() < 4 * S / n**0.5).all()
    assert ((ddpm.std(0) - S).abs() < 4 * S / (2 * n) ** 0.5).all()


@pytest.mark.parametrize(("prediction", "schedule"), CASES[::2], ids=lambda c: repr(c))
def test_ddim_eta1_equals_ddpm_on_any_timesteps(prediction, schedule):
    model_fn = denoiser(GaussianModel(schedule, MU, S, prediction), schedule, prediction)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    ts = schedule.timesteps(7)
    a = sample_ddpm(model_fn, noise, ts, schedule, generator=torch.Generator().manual_seed(2))
    b = sample_ddim(
        model_fn, noise, ts, schedule, generator=torch.Generator().manual_seed(2), eta=1
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = sample_ddim(model_fn, noise, ts, schedule, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c), "eta=0 must differ from the ancestral sampler"


@pytest.mark.parametrize("method", SAMPLERS)
@pytest.mark.parametrize(("prediction", "schedule"), CASES[::2], ids=lambda c: repr(c))
def test_last_step_returns_last_denoised(method, prediction, schedule):
    """The final step lands on clean data (sigma = 0): the output is the last x0 estimate."""
    model_fn = denoiser(GaussianModel(schedule, MU, S, prediction), schedule, prediction)
    seen = []
    out = SAMPLERS[method](
        model_fn, torch.randn(16, 2), schedule.timesteps(5), schedule, callback=seen.append,
        generator=torch.Generator().manual_seed(0), disable=True,
    )  # fmt: skip
    assert [info["i"] for info in seen] == [0, 1, 2, 3, 4]
    assert seen[-1]["t_next"].item() == schedule.t_end and seen[-1]["x"] is out
    torch.testing.assert_close(out, seen[-1]["denoised"], atol=1e-6, rtol=1e-6)


def test_single_step_is_the_first_denoised_estimate():
    schedule = FlowSchedule()
    model = GaussianModel(schedule, MU, S, "flow")
    noise = torch.randn(8, 2)
    out = sample(model, noise, method="dpmpp_2m", steps=1, prediction="flow", progress=False)
    torch.testing.assert_close(out, MU.expand(8, 2))  # E[x0 | pure noise] = mu


@pytest.mark.parametrize(
    ("timesteps", "message"),
    [([999.0], "at least 2"), ([10.0, 20.0, -1.0], "descending"), ([999.0, 500.0], "clean time")],
)
def test_bad_timesteps(timesteps, message):
    schedule = VPSchedule()
    model_fn = denoiser(GaussianModel(schedule, MU, S), schedule, "eps")
    with pytest.raises(ValueError, match=f"timesteps.*{message}"):
        sample_ddim(model_fn, torch.zeros(2, 2), torch.tensor(timesteps), schedule)


def test_bad_solver_knobs():
    schedule = VPSchedule()
    model_fn = denoiser(GaussianModel(schedule, MU, S), schedule, "eps")
    ts = schedule.timesteps(3)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(model_fn, torch.zeros(2, 2), ts, schedule, eta=-1.0)
    with pytest.raises(ValueError, match="variance"):
        sample_ddpm(model_fn, torch.zeros(2, 2), ts, schedule, variance="learned")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_host_times_model_fn_gets_the_time_on_the_host(name):
    """sample()'s model call marks itself ``host_times``: every solver then hands it t on the
    CPU (no device-to-host copy per call); any other model_fn gets t on x's device ("meta"
    here stands for a GPU)."""
    schedule = FlowSchedule()
    seen = {}

    def fn(x, t):
        seen.setdefault(getattr(fn, "host_times", False), set()).add(t.device.type)
        return x, x

    x = torch.zeros(2, 3, device="meta")
    ts = schedule.timesteps(3)
    for host in (False, True):
        fn.host_times = host
        SAMPLERS[name](fn, x, ts, schedule, disable=True, generator=None)
    assert seen == {False: {"meta"}, True: {"cpu"}}
