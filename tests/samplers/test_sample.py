import pytest
import torch

from adaptdiff.samplers import SAMPLERS, Accelerator, FlowSchedule, VPSchedule, sample

from .support import GaussianModel, TinyDenoiser

SHAPE = (2, 3, 8, 8)


class Recording(torch.nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x, t, **kwargs):
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        self.batches.append(x.shape[0])
        return self.model(x, t, **kwargs)


def _run(model, method="ddim", prediction="eps", steps=6, seed=0, **kwargs):
    return sample(
        model, SHAPE, method=method, steps=steps, prediction=prediction, progress=False,
        generator=torch.Generator().manual_seed(seed), **kwargs,
    )  # fmt: skip


# Regression values: computed once from this implementation (10 steps, TinyDenoiser seed 0,
# generator seed 0); they catch unintended changes, not errors present when they were recorded.
GOLDEN = [
    ("ddpm", "eps", {}, 121.5795, 0.316613),
    ("ddim", "eps", {}, 134.0524, 0.349095),
    ("ddim", "eps", {"eta": 0.5}, 137.0517, 0.356906),
    ("euler", "eps", {}, 134.0524, 0.349095),
    ("heun", "eps", {}, 142.9135, 0.372171),
    ("dpmpp_2m", "eps", {}, 141.8625, 0.369434),
    ("dpmpp_2m", "v", {}, 57.1234, 0.148759),
    ("euler", "flow", {}, 101.0443, 0.263136),
    ("heun", "flow", {}, 106.2581, 0.276714),
    ("dpmpp_2m", "flow", {}, 106.1933, 0.276545),
    ("ddim", "flow", {}, 101.0443, 0.263136),
]


@pytest.mark.parametrize(("method", "prediction", "options", "abs_sum", "abs_mean"), GOLDEN)
def test_golden_numbers(method, prediction, options, abs_sum, abs_mean):
    out = _run(TinyDenoiser(), method, prediction, steps=10, **options)
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert out.abs().sum().item() == pytest.approx(abs_sum, rel=1e-4)
    assert out.abs().mean().item() == pytest.approx(abs_mean, rel=1e-4)


def test_same_generator_same_samples():
    a, b = _run(TinyDenoiser(), "ddpm"), _run(TinyDenoiser(), "ddpm")
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(TinyDenoiser(), "ddpm", seed=1))


def test_guidance_scale_one_is_the_conditional_branch():
    y_c, y_u = torch.tensor([1.0, -2.0]), torch.zeros(2)
    model = Recording(TinyDenoiser())
    guided = _run(model, cond={"y": y_c}, uncond={"y": y_u}, guidance_scale=1.0)
    assert model.batches == [2] * 6, "scale 1 must run one branch"
    assert torch.equal(guided, _run(TinyDenoiser(), cond={"y": y_c}))
    model.batches.clear()
    no_uncond = _run(model, cond={"y": y_c}, guidance_scale=4.0)
    assert model.batches == [2] * 6 and torch.equal(no_uncond, guided)


@pytest.mark.parametrize("method", ["ddim", "heun"])
def test_guidance_batches_both_branches_in_one_call(method):
    y_c, y_u, w = torch.tensor([1.0, -2.0]), torch.zeros(2), 3.0
    net = TinyDenoiser()
    model = Recording(net)
    out, info = _run(
        model, method, cond={"y": y_c}, uncond={"y": y_u}, guidance_scale=w, return_info=True
    )
    calls = 11 if method == "heun" else 6
    assert model.batches == [4] * calls and info["nfe"] == calls
    assert all(r["branches"] == ("cond", "uncond") for r in info["records"])

    def manual(x, t):
        c, u = net(x, t, y=y_c), net(x, t, y=y_u)
        return u + w * (c - u)

    torch.testing.assert_close(out, _run(manual, method), atol=1e-5, rtol=1e-5)


class PassThrough(Accelerator):
    def __init__(self):
        self.log = []

    def on_sample_start(self, ctx):
        self.log.append("start")

    def before_model(self, step):
        self.log.append("before")
        return None

    def after_model(self, step, pred):
        self.log.append("after")
        return pred

    def on_sample_end(self, ctx):
        self.log.append("end")


@pytest.mark.parametrize("method", SAMPLERS)
def test_noop_accelerators_change_nothing(method):
    cond = {"cond": {"y": torch.ones(2)}, "uncond": {"y": torch.zeros(2)}, "guidance_scale": 2.0}
    plain = _run(TinyDenoiser(), method, **cond)
    hooked = _run(TinyDenoiser(), method, accelerators=[Accelerator(), PassThrough()], **cond)
    assert torch.equal(plain, hooked)


def test_accelerators_compose_in_order():
    order = []

    class Named(Accelerator):
        def __init__(self, name):
            self.name = name

        def before_model(self, step):
            order.append(f"{self.name}.before")

        def after_model(self, step, pred):
            order.append(f"{self.name}.after")
            return pred * 2 if self.name == "b" else pred + 1

    schedule = FlowSchedule()
    seen = []

    class Spy(Accelerator):
        def after_model(self, step, pred):
            seen.append(pred)
            return pred

    raw = []
    model = GaussianModel(schedule, 0.0, 1.0, "flow")

    def recorded(x, t):
        raw.append(model(x, t))
        return raw[-1]

    _run(recorded, "euler", "flow", steps=1, accelerators=[Named("a"), Named("b"), Spy()])
    assert order == ["a.before", "b.before", "a.after", "b.after"]
    torch.testing.assert_close(seen[0], (raw[0] + 1) * 2)


class CacheEveryOther(Accelerator):
    """Reuses the previous prediction on odd steps (a toy step cache)."""

    def on_sample_start(self, ctx):
        self.hits = 0

    def before_model(self, step):
        if step.index % 2 == 1:
            self.hits += 1
            return step.history[-1].pred
        return None


def test_cached_prediction_skips_the_model_call():
    model, acc = Recording(TinyDenoiser()), CacheEveryOther()
    out, info = _run(model, "dpmpp_2m", steps=6, accelerators=[acc], return_info=True)
    assert acc.hits == 3 and info["nfe"] == 3 and len(model.batches) == 3
    assert [r["evaluated"] for r in info["records"]] == [True, False] * 3
    assert [r["index"] for r in info["records"]] == list(range(6))
    assert not torch.equal(out, _run(TinyDenoiser(), "dpmpp_2m", steps=6))


def test_replaced_prediction_is_used():
    class ZeroVelocity(Accelerator):
        def after_model(self, step, pred):
            return torch.zeros_like(pred)

    noise = torch.randn(SHAPE)
    out = sample(
        TinyDenoiser(), noise, method="euler", steps=4, prediction="flow",
        accelerators=[ZeroVelocity()], progress=False,
    )  # fmt: skip
    torch.testing.assert_close(out, noise)  # u = 0: the ODE does not move


def test_first_accelerator_returning_a_prediction_wins():
    class Constant(Accelerator):
        def __init__(self, value):
            self.value, self.asked = value, 0

        def before_model(self, step):
            self.asked += 1
            return torch.full_like(step.x, self.value)

    first, second = Constant(0.0), Constant(5.0)
    model = Recording(TinyDenoiser())
    out, info = _run(
        model, "euler", "flow", steps=3, accelerators=[first, second], return_info=True
    )
    assert first.asked == 3 and second.asked == 0 and info["nfe"] == 0 and not model.batches
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, noise)  # velocity 0 everywhere: the state never moves


def test_dropping_the_uncond_branch_turns_guidance_off():
    """Adaptive guidance: after step 2, one branch per call."""

    class StopGuidance(Accelerator):
        def before_model(self, step):
            if step.index >= 2:
                step.branches.remove("uncond")

    model = Recording(TinyDenoiser())
    cond = {"cond": {"y": torch.ones(2)}, "uncond": {"y": torch.zeros(2)}, "guidance_scale": 5.0}
    out, info = _run(model, accelerators=[StopGuidance()], return_info=True, **cond)
    assert model.batches == [4, 4, 2, 2, 2, 2] and info["nfe"] == 6
    assert [r["branches"] for r in info["records"]][1:3] == [("cond", "uncond"), ("cond",)]
    assert not torch.equal(out, _run(TinyDenoiser(), **cond))


def test_supplied_branch_prediction_is_not_computed():
    """LinearAG: the uncond branch estimated from history, the cond branch computed."""

    class ReuseUncond(Accelerator):
        def after_model(self, step, pred):
            self.last_uncond = step.branch_preds["uncond"]
            return pred

        def before_model(self, step):
            if step.index >= 1:
                step.branch_preds["uncond"] = self.last_uncond

    net = TinyDenoiser()
    model = Recording(net)
    y_c, y_u, w = torch.ones(2), torch.zeros(2), 3.0
    out, info = _run(
        model, cond={"y": y_c}, uncond={"y": y_u}, guidance_scale=w, steps=3,
        accelerators=[ReuseUncond()], return_info=True,
    )  # fmt: skip
    assert model.batches == [4, 2, 2]
    assert [r["branches"] for r in info["records"]] == [("cond", "uncond"), ("cond",), ("cond",)]

    first_uncond = []

    def manual(x, t):
        if not first_uncond:
            first_uncond.append(net(x, t, y=y_u))
        c, u = net(x, t, y=y_c), first_uncond[0]
        return u + w * (c - u)

    torch.testing.assert_close(out, _run(manual, steps=3), atol=1e-5, rtol=1e-5)


def test_step_records_and_heun_calls():
    seen = []

    class Spy(Accelerator):
        def before_model(self, step):
            seen.append((step.index, step.call, step.t.item(), step.t_next.item()))

    _run(TinyDenoiser(), "heun", "flow", steps=3, accelerators=[Spy()])
    ts = FlowSchedule().timesteps(3).tolist()
    assert seen == [
        (0, 0, ts[0], ts[1]),
        (0, 1, ts[1], ts[1]),
        (1, 0, ts[1], ts[2]),
        (1, 1, ts[2], ts[2]),
        (2, 0, ts[2], ts[3]),
    ]


def test_on_sample_end_runs_when_the_model_fails():
    acc = PassThrough()

    def broken(x, t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(broken, accelerators=[acc])
    assert acc.log == ["start", "before", "end"]


def test_learned_sigma_channels_are_dropped():
    net = TinyDenoiser()

    def learned_sigma(x, t):
        out = net(x, t)
        return torch.cat([out, torch.full_like(out, 7.0)], 1)

    assert torch.equal(_run(learned_sigma), _run(net))


def test_explicit_timesteps_get_the_clean_end():
    model = Recording(TinyDenoiser())
    out, info = _run(model, steps=None, timesteps=[999, 500, 100], return_info=True)
    assert info["timesteps"].tolist() == [999, 500, 100, -1] and len(model.batches) == 3
    flow_ts = sample(
        TinyDenoiser(), SHAPE, method="euler", timesteps=[1.0, 0.5, 0.0], prediction="flow",
        progress=False, return_info=True,
    )[1]["timesteps"]  # fmt: skip
    assert flow_ts.tolist() == [1.0, 0.5, 0.0]


def test_default_schedules():
    seen = []

    class Spy(Accelerator):
        def on_sample_start(self, ctx):
            seen.append(ctx.schedule)

    _run(TinyDenoiser(), prediction="v", accelerators=[Spy()])
    _run(TinyDenoiser(), "euler", prediction="flow", accelerators=[Spy()])
    assert isinstance(seen[0], VPSchedule) and seen[0].beta_schedule == "linear"
    assert isinstance(seen[1], FlowSchedule)


def test_progress_bar_runs(capsys):
    sample(TinyDenoiser(), SHAPE, method="ddim", steps=2, progress=True)
    assert "/2 [" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"method": "lms"}, "method"),
        ({"prediction": "score"}, "prediction"),
        ({"eta": 0.5, "method": "euler"}, "eta"),
        ({"steps": None}, "steps"),
        ({"steps": 4, "timesteps": [999, 500]}, "steps"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"cond": {"y": torch.ones(2)}, "uncond": {"z": torch.ones(2)}}, "uncond"),
        ({"cond": {"y": 1}, "uncond": {"y": 2}, "guidance_scale": 2.0}, "uncond"),
        ({"accelerators": [object()]}, "accelerators"),
    ],
)
def test_bad_arguments(kwargs, argument):
    args = {"method": "ddim", "steps": 3, "progress": False} | kwargs
    with pytest.raises(ValueError, match=argument):
        sample(TinyDenoiser(), SHAPE, **args)
