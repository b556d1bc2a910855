"""Gradient guidance in `sample`, checked exactly on a 2-D mixture of 8 Gaussians whose
noised densities, scores and class posteriors are known in closed form: with w = 1 the
unconditional model guided by the exact classifier is the conditional model, for every
parameterisation."""

import math

import pytest
import torch

from adaptdiff.samplers import (
    Accelerator,
    FlowSchedule,
    GradGuidance,
    VPSchedule,
    classifier_guidance,
    predictor_guidance,
    sample,
    target,
)

K, RADIUS, STD = 8, 4.0, 0.3
MEANS = torch.stack(
    [RADIUS * torch.tensor([math.cos(a), math.sin(a)]) for a in 2 * math.pi * torch.arange(K) / K]
).double()


def _logits(x, t, schedule):
    """log p_t(x | k) up to a constant shared by all k: the class posterior's logits."""
    alpha, sigma = (a.double().view(-1, 1) for a in schedule.alpha_sigma(t))
    var = alpha**2 * STD**2 + sigma**2  # [B, 1]
    d2 = ((x[:, None, :] - alpha[:, None] * MEANS[None]) ** 2).sum(-1)  # [B, K]
    return -d2 / (2 * var), alpha, sigma, var


def mixture_model(schedule, prediction, label=None):
    """The exact denoiser of the mixture (or of component ``label``), as a ``prediction``-type
    network: eps = -sigma * score of p_t."""

    def model(x, t):
        logits, alpha, sigma, var = _logits(x, t, schedule)
        if label is None:
            r = torch.softmax(logits, dim=1)
        else:
            r = torch.nn.functional.one_hot(label, K).double()
        mean = alpha * (r @ MEANS)  # sum_k r_k alpha mu_k
        eps = sigma * (x - mean) / var  # -sigma * sum_k r_k (alpha mu_k - x) / var
        x0 = r @ MEANS + alpha * STD**2 / var * (x - mean)  # E[x0 | x_t], finite at alpha = 0
        return target(x0, eps, alpha.flatten(), sigma.flatten(), prediction)

    return model


def exact_classifier(schedule):
    return lambda x, t: _logits(x, t, schedule)[0]


CASES = {  # prediction: (schedule, method, timesteps)
    "eps": (VPSchedule("linear"), "ddim", None),
    "x0": (VPSchedule("linear"), "ddim", None),
    "v": (VPSchedule("linear"), "ddim", None),
    "flow": (FlowSchedule(), "euler", torch.linspace(0.995, 0, 41)),
}


def _run(model, noise, prediction, guidance=None, **kw):
    schedule, method, ts = CASES[prediction]
    steps = None if ts is not None else 40
    return sample(
        model, noise, method=method, steps=steps, timesteps=ts, prediction=prediction,
        schedule=schedule, progress=False, grad_guidance=guidance, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("prediction", list(CASES))
def test_exact_classifier_guidance_is_the_conditional_model(prediction):
    schedule = CASES[prediction][0]
    labels = torch.arange(16) % K
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guidance = GradGuidance(classifier_guidance(exact_classifier(schedule), labels))
    guided = _run(mixture_model(schedule, prediction), noise, prediction, guidance)
    conditional = _run(mixture_model(schedule, prediction, labels), noise, prediction)
    unguided = _run(mixture_model(schedule, prediction), noise, prediction)
    assert torch.allclose(guided, conditional, atol=1e-4, rtol=0)
    assert (guided - unguided).abs().max() > 1.0  # guidance moved the samples

    hits = (torch.cdist(guided, MEANS).argmin(1) == labels).float().mean()
    base = (torch.cdist(unguided, MEANS).argmin(1) == labels).float().mean()
    assert hits == 1.0 and base < 0.5


def test_hit_rate_of_a_learned_style_classifier_with_scale():
    """A classifier that knows the classes only up to a temperature: w compensates it."""
    schedule = VPSchedule("linear")
    labels = torch.arange(200) % K
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    soft = lambda x, t: 0.5 * exact_classifier(schedule)(x, t)  # noqa: E731
    model = mixture_model(schedule, "eps")
    for w, low in ((0.0, 0.0), (2.0, 0.99)):
        out = _run(model, noise, "eps", GradGuidance(classifier_guidance(soft, labels), scale=w))
        hits = (torch.cdist(out, MEANS).argmin(1) == labels).float().mean().item()
        assert hits >= low and (w > 0 or hits < 0.3), (w, hits)


class _ReuseOddSteps(Accelerator):
    """Skips every odd step with the previous prediction, recording what history held."""

    def __init__(self):
        self.seen = []

    def before_model(self, step):
        if step.index % 2 and step.history:
            self.seen.append(step.history[-1].pred)
            return step.history[-1].pred
        return None


def test_gradient_is_fresh_on_every_call_and_history_stays_unguided():
    schedule = VPSchedule("linear")
    labels = torch.arange(6) % K
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    raw, calls = [], []
    model = mixture_model(schedule, "eps")

    def recording_model(x, t):
        raw.append(model(x, t))
        return raw[-1]

    grad = classifier_guidance(exact_classifier(schedule), labels)

    def counting(x, t):
        calls.append(x.detach().clone())
        return grad(x, t)

    acc = _ReuseOddSteps()
    _, info = _run(
        recording_model, noise, "eps", GradGuidance(counting), accelerators=[acc],
        return_info=True,
    )  # fmt: skip
    assert len(calls) == len(info["records"]) == 40 == info["grad_guided"]
    assert len(raw) == 20  # odd steps skipped the model...
    for seen, out in zip(acc.seen, raw, strict=False):  # ...and reused its unguided output
        assert torch.equal(seen, out)
    assert all(not torch.equal(a, b) for a, b in zip(calls, calls[1:], strict=False))


def test_scale_zero_and_an_empty_interval_leave_sampling_unguided():
    schedule = VPSchedule("linear")
    labels = torch.arange(4) % K
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = mixture_model(schedule, "eps")
    plain = _run(model, noise, "eps")
    fn = classifier_guidance(exact_classifier(schedule), labels)
    for guidance in (GradGuidance(fn, scale=0.0), GradGuidance(fn, interval=(2000.0, 3000.0))):
        out, info = _run(model, noise, "eps", guidance, return_info=True)
        assert torch.equal(out, plain) and info["grad_guided"] == 0
    # an interval over the late steps guides those only
    _, info = _run(model, noise, "eps", GradGuidance(fn, interval=(0.0, 500.0)), return_info=True)
    flags = [(r["t"] <= 500.0, r["grad_guided"]) for r in info["records"]]
    assert all(a == b for a, b in flags) and 0 < info["grad_guided"] < 40


def test_flow_at_pure_noise_stays_unguided():
    schedule = FlowSchedule()
    labels = torch.arange(4) % K
    noise = torch.randn(4, 2, dtype=torch.float64)
    guidance = GradGuidance(classifier_guidance(exact_classifier(schedule), labels))
    out, info = sample(
        mixture_model(schedule, "flow"), noise, method="euler", steps=10, prediction="flow",
        progress=False, grad_guidance=guidance, return_info=True,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert [r["grad_guided"] for r in info["records"]] == [False] + [True] * 9  # t = 1: alpha 0


@pytest.mark.parametrize("normalize", ["l2", "rel"])
def test_normalized_gradients_have_the_documented_size(normalize):
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, dtype=torch.float64) * torch.arange(1, 6).view(5, 1, 1)
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x0 = (x - sigma * eps) / alpha
    g = torch.randn(5, 3, 4, dtype=torch.float64) * 10
    guidance = GradGuidance(lambda x, t: g, scale=2.5, normalize=normalize)
    x0_g, eps_g = guidance.apply(x, torch.tensor(0.3), alpha, sigma, x0, eps)
    step = (eps - eps_g).flatten(1).norm(dim=1)
    want = 2.5 * (eps.flatten(1).norm(dim=1) if normalize == "rel" else sigma.double())
    assert torch.allclose(step, want.expand(5))
    assert torch.allclose(alpha * x0_g + sigma * eps_g, x)  # still a decomposition of x_t


def test_predictor_guidance_gradients():
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    f = lambda x, t: -((x - c) ** 2).sum(1)  # noqa: E731
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(3)
    assert torch.allclose(predictor_guidance(f)(x, t), -2 * (x - c))
    y, tau = 0.5, 2.0
    want = (y - f(x, t)).view(-1, 1) * (-2 * (x - c)) / tau**2
    assert torch.allclose(predictor_guidance(f, target=y, tau=tau)(x, t), want)


def test_bad_guidance_is_refused_clearly():
    with pytest.raises(ValueError, match="GradGuidance: fn must be callable"):
        GradGuidance(3)
    with pytest.raises(ValueError, match="GradGuidance: normalize must be one of"):
        GradGuidance(lambda x, t: x, normalize="max")
    with pytest.raises(ValueError, match="GradGuidance: interval"):
        GradGuidance(lambda x, t: x, interval=(1.0, 0.0))
    schedule = VPSchedule("linear")
    model = mixture_model(schedule, "eps")
    noise = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_guidance must be a GradGuidance"):
        _run(model, noise, "eps", lambda x, t: x)
    with pytest.raises(ValueError, match=r"GradGuidance: fn must return a gradient shaped like x"):
        _run(model, noise, "eps", GradGuidance(lambda x, t: x[:, :1]))
    bad_classifier = classifier_guidance(lambda x, t: x.sum(1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"classifier_guidance: .* logits \[B, classes\]"):
        _run(model, noise, "eps", GradGuidance(bad_classifier))
    with pytest.raises(ValueError, match=r"predictor_guidance: .* \[B\] values"):
        _run(model, noise, "eps", GradGuidance(predictor_guidance(lambda x, t: x)))
