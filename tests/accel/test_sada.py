import pytest
import torch

from adaptdiff.accel.guidance.adaptive import AdaptiveGuidance, LinearAG
from adaptdiff.accel.steps.sada import ADAMS, SADA, lagrange_weights, momentum
from adaptdiff.samplers import FlowSchedule, VPSchedule, sample
from tests.samplers.support import GaussianModel, TinyDenoiser
from tests.support.models import tiny_dit


class AlwaysStable(SADA):
    def _momentum(self, step):
        m = super()._momentum(step)
        return None if m is None else torch.zeros_like(m)


def _gauss(prediction):
    schedule = FlowSchedule() if prediction == "flow" else VPSchedule()
    return GaussianModel(schedule, mu=0.5, s=0.3, prediction=prediction), schedule


def _run(model, schedule, prediction, method, steps=20, accelerators=()):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return sample(
        model, x, method=method, steps=steps, prediction=prediction, schedule=schedule,
        accelerators=accelerators, progress=False, return_info=True,
    )  # fmt: skip


def test_adams_prediction_and_velocity_extrapolation_are_exact_on_low_degree():
    assert sum(ADAMS) == pytest.approx(1.0)
    # a straight trajectory (constant drift) is predicted exactly: zero momentum
    f = torch.full((5,), 2.0)
    y_prev, dtau = torch.zeros(5), -0.1
    assert torch.equal(momentum(y_prev + dtau * f, y_prev, dtau, f, f, f), torch.zeros(5))
    # second difference of a linear drift is zero, so the momentum vanishes too
    f1, f2, f3 = torch.tensor(3.0), torch.tensor(2.0), torch.tensor(1.0)
    assert float(momentum(torch.tensor(7.0), torch.tensor(1.0), -0.1, f1, f2, f3)) == 0.0
    assert float(2 * f1 - f2) == 4.0  # linear velocity extrapolation hits the next point


@pytest.mark.parametrize("n", [2, 3, 4])
def test_lagrange_weights_exact_on_polynomials_of_degree_below_n(n):
    nodes = [1.0, 3.0, 4.0, 7.0][:n]
    for degree in range(n):
        w = lagrange_weights(nodes, 9.0)
        assert sum(wi * t**degree for wi, t in zip(w, nodes, strict=False)) == pytest.approx(
            9.0**degree
        )
    w = lagrange_weights(nodes, 9.0)
    assert sum(wi * t**n for wi, t in zip(w, nodes, strict=False)) != pytest.approx(9.0**n)


@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m"])
def test_criterion_off_is_the_baseline_bit_for_bit(method):
    model = TinyDenoiser()
    ref, _ = _run(model, VPSchedule(), "eps", method)
    out, info = _run(model, VPSchedule(), "eps", method, accelerators=[SADA(criterion="off")])
    assert torch.equal(out, ref) and info["nfe"] == 20


def test_never_skips_before_three_drifts_and_respects_max_skips():
    model, schedule = _gauss("eps")
    sada = AlwaysStable(start=0.0, end=1.0, max_skips=1)
    _, info = _run(model, schedule, "eps", "euler", accelerators=[sada])
    assert sada.skipped == list(range(3, 20, 2))
    assert info["nfe"] == 20 - len(sada.skipped)
    sada = AlwaysStable(start=0.0, end=1.0, max_skips=2)
    _run(model, schedule, "eps", "euler", accelerators=[sada])
    assert sada.skipped[:4] == [3, 4, 6, 7]


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("approximation", ["auto", "eps", "velocity", "lagrange"])
def test_skipped_steps_stay_close_to_the_exact_run(prediction, method, approximation):
    model, schedule = _gauss(prediction)
    ref, _ = _run(model, schedule, prediction, method, steps=30)
    sada = AlwaysStable(start=0.2, end=0.9, approximation=approximation)
    out, info = _run(model, schedule, prediction, method, steps=30, accelerators=[sada])
    assert len(sada.skipped) >= 8 and info["nfe"] == 30 - len(sada.skipped)
    err = (out - ref).norm() / ref.norm()
    assert err < 0.05, err


def test_lagrange_late_phase_runs_the_model_on_its_grid_only():
    model, schedule = _gauss("eps")
    sada = SADA(criterion="adams", start=1.0, end=1.0, lagrange_from=0.5, lagrange_every=3)
    ref, _ = _run(model, schedule, "eps", "ddim")
    out, info = _run(model, schedule, "eps", "ddim", accelerators=[sada])
    assert sada.skipped == [i for i in range(10, 20) if (i - 10) % 3]
    assert (out - ref).norm() / ref.norm() < 0.05


def test_real_criterion_skips_some_steps_on_a_smooth_problem():
    model, schedule = _gauss("flow")
    sada = SADA(max_skips=2)
    ref, _ = _run(model, schedule, "flow", "euler", steps=40)
    out, info = _run(model, schedule, "flow", "euler", steps=40, accelerators=[sada])
    assert len(sada.skipped) >= 10 and min(sada.skipped) >= 8 and max(sada.skipped) < 38
    assert (out - ref).norm() / ref.norm() < 0.05


def test_refuses_conflicting_combinations():
    model = TinyDenoiser()
    y = {"y": torch.ones(2)}
    kw = dict(method="euler", steps=8, guidance_scale=2.0, cond=y, uncond={"y": torch.zeros(2)})
    lag = LinearAG({1: [1.0, 0.0, 0.0]}, history=1, steps=[1])
    for accs in ([SADA(), lag], [lag, SADA()]):
        with pytest.raises(ValueError, match="cannot be combined"):
            sample(model, (2, 3, 4, 4), accelerators=accs, progress=False, **kw)
    with pytest.raises(ValueError, match="heun"):
        kw["method"] = "heun"
        sample(model, (2, 3, 4, 4), accelerators=[SADA()], progress=False, **kw)
    with pytest.raises(ValueError, match="cannot be combined"):
        sample(
            model, (2, 3, 4, 4), accelerators=[AdaptiveGuidance(), SADA(tokens=True)],
            progress=False, **kw,
        )  # fmt: skip


def test_composes_with_adaptive_guidance():
    model = TinyDenoiser()
    y, y_null = {"y": torch.tensor([0.0, 0.2])}, {"y": torch.zeros(2)}
    ag, sada = AdaptiveGuidance(0.99), AlwaysStable(start=0.0, end=1.0)
    _, info = sample(
        model, (2, 3, 4, 4), method="dpmpp_2m", steps=12, guidance_scale=2.0, cond=y,
        uncond=y_null, accelerators=[ag, sada], progress=False, return_info=True,
    )  # fmt: skip
    assert sada.skipped and (ag.switched_at >= 0).any()
    assert info["nfe"] == 12 - len(sada.skipped)


def _tiny_dit():
    return tiny_dit(perturb=0.05, learn_sigma=False, num_classes=0)


def test_token_wise_recomputation_on_a_dit():
    model = _tiny_dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = sample(model, x, method="euler", steps=16, progress=False)
    sada = SADA(start=1.0, end=1.0, tokens=True, window=2, max_skips=1)
    out = sample(model, x, method="euler", steps=16, progress=False, accelerators=[sada])
    assert sada.token_fraction and all(0 < f < 1 for f in sada.token_fraction)
    assert (out - ref).norm() / ref.norm() < 0.2
    assert all("forward" not in vars(b) for b in model.blocks)  # hooks removed
    assert torch.equal(sample(model, x, method="euler", steps=16, progress=False), ref)
