import pytest
import torch

from adaptdiff.accel.guidance.adaptive import AdaptiveGuidance, LinearAG
from adaptdiff.accel.steps.sada import ADAMS, SADA, lagrange_weights, momentum
from adaptdiff.samplers import Accelerator, FlowSchedule, VPSchedule, sample
from tests.samplers.support import GaussianModel, TinyDenoiser

from .support import (
    ReusePrediction,
    block_share,
    identity_blocks,
    real_dit,
    rel_err,
    run,
    tiny_dit,
)

# The rule the tests below were written for: at most one skip in a row, no late phase (the
# defaults are the reference's: at most four in a row, the Lagrange phase from 48 % of the steps).
OLD = dict(max_skips=1, lagrange_from=None, lagrange_terms=3)


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
    sada = AlwaysStable(start=0.0, end=1.0, **OLD)
    _, info = _run(model, schedule, "eps", "euler", accelerators=[sada])
    assert sada.skipped == list(range(3, 20, 2))
    assert info["nfe"] == 20 - len(sada.skipped)
    sada = AlwaysStable(start=0.0, end=1.0, **{**OLD, "max_skips": 2})
    _run(model, schedule, "eps", "euler", accelerators=[sada])
    assert sada.skipped[:4] == [3, 4, 6, 7]


class Steps(Accelerator):
    """Every step's (x0, eps) as the solver gets them, and whether the model ran."""

    def on_sample_start(self, ctx):
        self.x0, self.eps, self.evaluated = [], [], []

    def after_model(self, step, pred):
        x0, eps = step.to_x0_eps(pred)
        self.x0.append(x0.double())
        self.eps.append(eps.double())
        self.evaluated.append(step.evaluated)
        return pred


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
@pytest.mark.parametrize("approximation", ["eps", "velocity", "lagrange"])
def test_a_skipped_step_gets_its_approximation_formula(prediction, approximation):
    model, schedule = _gauss(prediction)
    sada, spy = AlwaysStable(start=0.2, end=0.9, approximation=approximation, **OLD), Steps()
    _run(model, schedule, prediction, "euler", steps=30, accelerators=[sada, spy])
    assert len(sada.skipped) >= 8
    x0, eps = spy.x0, spy.eps
    f = [e - x for e, x in zip(eps, x0, strict=True)]  # the rectified-flow drift
    for i in sada.skipped:
        assert not spy.evaluated[i]
        if approximation == "eps":  # the last noise prediction, x0 from the new state
            got, want, reused = eps[i], eps[i - 1], None
        elif approximation == "velocity":  # linear extrapolation of the drift
            got, want, reused = f[i], 2 * f[i - 1] - f[i - 2], f[i - 1]
        else:  # x0 extrapolated through the last three computed steps
            nodes = [j for j in range(i) if spy.evaluated[j]][-3:]
            w = lagrange_weights([float(j) for j in nodes], float(i))
            got, reused = x0[i], x0[nodes[-1]]
            want = sum(wj * x0[j] for wj, j in zip(w, nodes, strict=True))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        if reused is not None:  # the extrapolation differs from reuse by 10x the tolerance
            assert rel_err(reused, want) > 1e-4, i


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("approximation", ["auto", "eps", "velocity", "lagrange"])
def test_skipped_steps_stay_close_to_the_exact_run(prediction, method, approximation):
    model, schedule = _gauss(prediction)
    ref, _ = _run(model, schedule, prediction, method, steps=30)
    sada = AlwaysStable(start=0.2, end=0.9, approximation=approximation, **OLD)
    out, info = _run(model, schedule, prediction, method, steps=30, accelerators=[sada])
    assert len(sada.skipped) >= 8 and info["nfe"] == 30 - len(sada.skipped)
    err = rel_err(out, ref)
    assert err < 0.05, err
    # the naive alternative on the same steps: the last prediction reused as it is
    reuse, _ = _run(model, schedule, prediction, method, steps=30,
                    accelerators=[ReusePrediction(sada.skipped)])  # fmt: skip
    err_reuse = rel_err(reuse, ref)
    resolved = approximation
    if approximation == "auto":
        resolved = "velocity" if prediction == "flow" else "eps"
    if resolved == "eps":
        # x0/eps reuse is a reuse: no worse than reusing the prediction itself (the same thing
        # for an eps model); its formula is checked in test_a_skipped_step_gets_its_...
        assert err <= err_reuse * 1.01, (err, err_reuse)
    else:  # an extrapolation: far better than reuse (measured 4.9x to 18x)
        assert err < err_reuse / 3, (err, err_reuse)


def test_lagrange_late_phase_runs_the_model_on_its_grid_only():
    model, schedule = _gauss("eps")
    sada = SADA(
        criterion="adams", start=1.0, end=1.0, lagrange_from=0.5, lagrange_every=3, lagrange_terms=3
    )
    ref, _ = _run(model, schedule, "eps", "ddim")
    out, info = _run(model, schedule, "eps", "ddim", accelerators=[sada])
    assert sada.skipped == [i for i in range(10, 20) if (i - 10) % 3]
    assert (out - ref).norm() / ref.norm() < 0.05


class RowReuse(Accelerator):
    """The naive baseline per sample: at each sample's skipped steps its last prediction is
    reused as it is (the model computes every row; only the samples' predictions matter)."""

    def __init__(self, per_sample):
        self.per_sample = [set(s) for s in per_sample]

    def on_sample_start(self, ctx):
        self.last = None

    def after_model(self, step, pred):
        rows = [b for b, s in enumerate(self.per_sample) if step.index in s]
        if rows and self.last is not None:
            pred = pred.clone()
            pred[rows] = self.last[rows]
        self.last = pred
        return pred


# Per sample with 2 skips in a row, the second sample's own criterion moves two of its skips
# to the last steps (33 and 36 instead of 34 and 37), where extrapolating an extrapolated
# velocity costs more: measured 0.019 against reuse 0.034 (1.75x); one skip in a row: 0.00076
# against 0.018.
@pytest.mark.parametrize(("per_sample", "max_skips"), [(False, 2), (True, 1)])
def test_real_criterion_skips_some_steps_on_a_smooth_problem(per_sample, max_skips):
    model, schedule = _gauss("flow")
    sada = SADA(**{**OLD, "max_skips": max_skips}, per_sample=per_sample)
    ref, _ = _run(model, schedule, "flow", "euler", steps=40)
    out, info = _run(model, schedule, "flow", "euler", steps=40, accelerators=[sada])
    for skipped in sada.skipped_per_sample:
        assert len(skipped) >= 10 and min(skipped) >= 8 and max(skipped) < 38
    reuse, _ = _run(model, schedule, "flow", "euler", steps=40,
                    accelerators=[RowReuse(sada.skipped_per_sample)])  # fmt: skip
    err, err_reuse = rel_err(out, ref), rel_err(reuse, ref)
    assert err < 0.05 and err < err_reuse / 3, (err, err_reuse)  # measured 0.0046, 0.032


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
    ag, sada = AdaptiveGuidance(0.99), AlwaysStable(start=0.0, end=1.0, **OLD)
    _, info = sample(
        model, (2, 3, 4, 4), method="dpmpp_2m", steps=12, guidance_scale=2.0, cond=y,
        uncond=y_null, accelerators=[ag, sada], progress=False, return_info=True,
    )  # fmt: skip
    assert sada.skipped and (ag.switched_at >= 0).any()
    assert info["nfe"] == 12 - len(sada.skipped)


def test_token_wise_recomputation_on_a_dit():
    model = real_dit(learn_sigma=False, num_classes=0)  # flow matching, t in [0, 1]
    assert block_share(model, t=0.5) > 0.3  # the blocks carry a large share of the output
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(method="euler", steps=16, prediction="flow", progress=False)
    ref = sample(model, x, **kw)
    lengths, last = [], []  # per model call: tokens into block 1, the last block's output
    hooks = [
        model.blocks[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])),
        model.blocks[-1].register_forward_hook(lambda m, a, out: last.append(out.clone())),
    ]
    sada = SADA(start=1.0, end=1.0, tokens=True, window=2, **OLD)
    out = sample(model, x, accelerators=[sada], **kw)
    for h in hooks:
        h.remove()
    steps = [i for i, n in enumerate(lengths) if n < 16]
    assert steps == [3, 5, 7, 9, 11, 13, 15] and sada.token_fraction == [0.25] * 7
    for i in steps:
        # one token per 2x2 cell recomputed; the other 12 keep the last call's block output
        same = (last[i] == last[i - 1]).all(-1)
        assert (same.sum(1) == 12).all(), i
    # the zero-update baseline on the same calls: every block the identity
    with identity_blocks(model, range(4), steps):
        zero = sample(model, x, **kw)
    err, err_zero = rel_err(out, ref), rel_err(zero, ref)
    assert 0 < err < err_zero / 5, (err, err_zero)  # measured 0.014 against 0.128
    # Recomputing a quarter of the tokens (attention among them only) does not beat keeping
    # every token's last velocity on this random model (measured 0.0139 against 0.0127); it
    # stays within a small factor of it.
    reuse = sample(model, x, accelerators=[ReusePrediction(steps)], **kw)
    assert err < 1.5 * rel_err(reuse, ref)
    assert all("forward" not in vars(b) for b in model.blocks)  # hooks removed
    assert torch.equal(sample(model, x, **kw), ref)


# -- per-sample skipping ---------------------------------------------------------------------
def _labelled(model, batch=4):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(batch) % model.config.num_classes
    return x, {"y": y}, {"y": torch.full_like(y, model.null_label)}


class Rows:
    """Counts the rows of every model call (a forward pre-hook)."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.seen.append(len(a[0])))


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m"])
def test_per_sample_batch_equals_each_trajectory_alone(method):
    model = real_dit(learn_sigma=False)  # class-conditional, flow matching
    assert block_share(model, t=0.5) > 0.3  # the blocks carry a large share of the output
    x, cond, uncond = _labelled(model)
    kw = dict(method=method, steps=16, prediction="flow", guidance_scale=3.0, progress=False)
    rows = Rows(model)
    sada = SADA()  # the reference's defaults, per sample
    out = sample(model, x, cond=cond, uncond=uncond, accelerators=[sada], **kw)
    rows.handle.remove()
    B = x.shape[0]
    # the samples disagree at some steps: those calls carry the computing rows only (both
    # guidance branches of each), and steps every sample skips make no call
    assert any(0 < n < B for n in sada.rows_per_call), sada.rows_per_call
    assert rows.seen == [2 * n for n in sada.rows_per_call]
    computed = sum(16 - len(s) for s in sada.skipped_per_sample)
    assert sum(rows.seen) == 2 * computed < 2 * B * 16
    assert len({tuple(s) for s in sada.skipped_per_sample}) > 1
    for b in range(B):
        alone = SADA()
        one = sample(
            model, x[b : b + 1], cond={"y": cond["y"][b : b + 1]},
            uncond={"y": uncond["y"][b : b + 1]}, accelerators=[alone], **kw,
        )  # fmt: skip
        assert alone.skipped_per_sample[0] == sada.skipped_per_sample[b], b
        torch.testing.assert_close(out[b : b + 1], one, rtol=1e-5, atol=1e-5)


class Spy(SADA):
    """Records each step's momentum."""

    def on_sample_start(self, ctx):
        super().on_sample_start(ctx)
        self.momenta = {}

    def _momentum(self, step):
        m = super()._momentum(step)
        if m is not None:
            self.momenta[step.index] = m.double()
        return m


@pytest.mark.parametrize("per_sample", [True, False])
def test_the_criterion_per_sample_or_over_the_whole_batch(per_sample):
    model = real_dit(learn_sigma=False)
    x, cond, uncond = _labelled(model)
    steps = 16
    kw = dict(method="dpmpp_2m", steps=steps, prediction="flow", progress=False)
    sada = Spy(max_skips=1, lagrange_from=None, per_sample=per_sample)
    rows = Rows(model)
    sample(model, x, cond=cond, accelerators=[sada], **kw)
    rows.handle.remove()
    B, first, last = x.shape[0], sada.first, sada.last
    checked = 0
    for b in range(B):
        skipped = sada.skipped_per_sample[b]
        for i, m in sada.momenta.items():
            if not first <= i < last or (i - 1) in skipped:  # outside, or capped by max_skips
                continue
            mean = m[b].mean() if per_sample else m.mean()
            assert (i in skipped) == bool(mean <= 0), (b, i, float(mean))
            checked += 1
    assert checked >= B * 4
    if per_sample:  # the samples' schedules differ and calls drop rows
        assert len({tuple(s) for s in sada.skipped_per_sample}) > 1
        assert any(0 < n < B for n in rows.seen)
    else:  # one schedule for the batch: every call carries every row
        assert all(s == sada.skipped for s in sada.skipped_per_sample)
        assert set(rows.seen) == {B} and len(rows.seen) == steps - len(sada.skipped)


def test_per_sample_lagrange_uses_each_samples_own_computed_steps():
    model = real_dit(learn_sigma=False)
    x, cond, _ = _labelled(model)
    spy = Steps()
    sada = SADA(approximation="lagrange", lagrange_from=None, max_skips=2)
    sample(model, x, cond=cond, method="dpmpp_2m", steps=16, prediction="flow",
           accelerators=[sada, spy], progress=False)  # fmt: skip
    assert len({tuple(s) for s in sada.skipped_per_sample}) > 1
    checked = 0
    for b, skipped in enumerate(sada.skipped_per_sample):
        for i in skipped:
            nodes = [j for j in range(i) if j not in skipped][-4:]
            w = lagrange_weights([float(j) for j in nodes], float(i))
            want = sum(wj * spy.x0[j][b] for wj, j in zip(w, nodes, strict=True))
            torch.testing.assert_close(spy.x0[i][b], want, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= 8


def test_defaults_are_the_references():
    s = SADA()
    assert (s.start, s.end, s.max_skips) == (0.2, 0.94, 4)  # acc_range=(10, 47), max_interval=4
    assert (s.lagrange_from, s.lagrange_every, s.lagrange_terms) == (0.48, 4, 4)
    assert s.per_sample
    # 50 steps as in the reference's demos: its late phase from step 24, at most 4 skips in a row
    model, schedule = _gauss("eps")
    sada = AlwaysStable()
    _run(model, schedule, "eps", "dpmpp_2m", steps=50, accelerators=[sada])
    assert sada.skipped[:5] == [10, 11, 12, 13, 15]  # the momentum phase: 4 in a row at most
    late = [i for i in sada.skipped if i >= 24]
    assert late == [i for i in range(25, 47) if (i - 24) % 4]  # every 4th step computes
    with pytest.raises(ValueError, match="per_sample must be a bool"):
        SADA(per_sample=1)


def test_per_sample_refuses_ras():
    model = tiny_dit()
    from adaptdiff.accel.tokens.ras import RAS

    ras = RAS(model, sample_ratio=0.5)
    try:
        with pytest.raises(ValueError, match=r"SADA\(per_sample=True\) cannot be combined with"):
            run(model, [SADA(), ras])
        assert torch.isfinite(run(model, [SADA(per_sample=False), ras])).all()
    finally:
        ras.remove()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipelines_run_per_sample_and_the_whole_batch_rule(family):
    """Both rules inside a pipeline with two prompts (per sample: the transformer's batch carries
    the rows that compute; tests/accel/test_pipelines_sada.py compares each prompt alone)."""
    pytest.importorskip("diffusers")
    from adaptdiff import accel
    from adaptdiff.bench.pipelines import build_pipeline

    pipe, kw = build_pipeline(family, batch=2)
    try:
        accel.apply(pipe, accel.SADAConfig(start=0.0, end=1.0))  # per sample
        out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        call = accel.summary(pipe)["calls"][-1]
        assert torch.isfinite(out).all() and call["rows"] < call["rows_plain"]
        per_sample = next(iter(call["contexts"].values()))["sada"]["skipped_per_sample"]
        assert len(per_sample) == 2 and all(per_sample)
        accel.remove(pipe)
        accel.apply(pipe, accel.SADAConfig(start=0.0, end=1.0, per_sample=False))
        out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(out).all()
        assert accel.summary(pipe)["calls"][-1]["skipped_steps"]
        accel.remove(pipe)
        # one sample per call: the per-sample rule is the whole-batch rule, and it runs
        pipe, kw = build_pipeline(family)
        accel.apply(pipe, accel.SADAConfig(start=0.0, end=1.0))
        assert torch.isfinite(pipe(**kw, generator=torch.Generator().manual_seed(0)).images).all()
    finally:
        accel.remove(pipe)


def test_per_sample_with_a_static_schedule_equals_each_trajectory_alone():
    """A schedule keeps its reused outputs per (branch, sample) row, so it follows the rows a
    per-sample call carries: the batch samples as each trajectory alone."""
    from adaptdiff import accel

    model = real_dit(learn_sigma=False)
    x, cond, uncond = _labelled(model)
    steps = 16

    def schedule():
        s = accel.Schedule.for_model(model, steps)
        for i in (5, 8, 11):  # reuse every block's MLP output
            s.mask[i] = [[True, False] for _ in s.components]
        return s

    kw = dict(method="dpmpp_2m", steps=steps, prediction="flow", guidance_scale=3.0, progress=False)

    def run(rows):
        handle = accel.apply(model, accel.ScheduleConfig(schedule()), accel.SADAConfig())
        try:
            out = sample(
                model, x[rows], cond={"y": cond["y"][rows]}, uncond={"y": uncond["y"][rows]},
                accelerators=[handle], **kw,
            )  # fmt: skip
            return out, accel.summary(model)["default"]
        finally:
            accel.remove(model)

    out, summary = run(slice(None))
    per_sample = summary["sada"]["skipped_per_sample"]
    assert len({tuple(s) for s in per_sample}) > 1 and summary["hits"] > 0
    for b in range(x.shape[0]):
        one, alone = run(slice(b, b + 1))
        assert alone["sada"]["skipped_per_sample"][0] == per_sample[b]
        torch.testing.assert_close(out[b : b + 1], one, rtol=1e-5, atol=1e-5)


def test_per_sample_token_wise_caches_follow_each_sample():
    """Token-wise with per-sample skipping: a call carries the computing rows only, and each
    row's untouched tokens keep *its own* last block output (the caches are kept per batch
    slot), not another row's."""
    model = real_dit(learn_sigma=False)
    x, cond, _ = _labelled(model)
    sada = SADA(tokens=True, window=2)
    calls = []  # per call: the slots (samples) it carried, its token count, the last block's out

    def record(module, args, out):
        slots = sada.step.batch_slots.tolist()
        calls.append((slots, args[0].shape[1], out.detach().clone()))

    hook = model.blocks[-1].register_forward_hook(record)
    try:
        sample(model, x, cond=cond, method="dpmpp_2m", steps=16, prediction="flow",
               accelerators=[sada], progress=False)  # fmt: skip
    finally:
        hook.remove()
    B, N = x.shape[0], calls[0][2].shape[1]
    assert sada.token_fraction and any(0 < n < B for n in sada.rows_per_call)
    last, checked = {}, 0  # each sample's last block output
    for slots, tokens, out in calls:
        if tokens < N and len(slots) < B:  # a token-subset call on some rows only
            for r, b in enumerate(slots):
                kept = (out[r] == last[b]).all(-1)  # tokens that kept sample b's output
                assert N - tokens <= int(kept.sum()) < N, (slots, b)
                checked += 1
        for r, b in enumerate(slots):
            last[b] = out[r]
    assert checked > 0
