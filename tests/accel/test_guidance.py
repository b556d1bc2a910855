import json

import pytest
import torch

from adaptdiff import cli
from adaptdiff.accel.guidance.adaptive import (
    AdaptiveGuidance,
    LinearAG,
    calibrate_linear_ag,
    fit_linear_ag,
    load_linear_ag,
    save_linear_ag,
)
from adaptdiff.samplers import Accelerator, VPSchedule, sample
from tests.samplers.support import TinyDenoiser
from tests.support.models import tiny_dit

from .support import real_dit, rel_err


def _run(model, accelerators=(), method="euler", steps=8, y=None, y_null=None, **kw):
    y = torch.tensor([3.0, -2.0, 5.0]) if y is None else y
    y_null = torch.zeros_like(y) if y_null is None else y_null
    return sample(
        model, (len(y), 3, 6, 6), method=method, steps=steps, guidance_scale=3.0,
        cond={"y": y}, uncond={"y": y_null}, accelerators=accelerators, progress=False,
        generator=torch.Generator().manual_seed(0), return_info=True, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m", "heun"])
def test_ag_above_one_is_cfg_bit_for_bit(method):
    model = TinyDenoiser()
    ref, ref_info = _run(model, method=method)
    out, info = _run(model, [AdaptiveGuidance(1.01)], method=method)
    assert torch.equal(out, ref)
    assert info["nfe_per_sample"] == ref_info["nfe_per_sample"] == 2 * ref_info["nfe"]


class Patterns(torch.nn.Module):
    """Label y predicts a fixed pattern whatever x; patterns of different labels are
    nearly orthogonal, so rows whose cond and uncond labels differ never agree."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.patterns = torch.randn(3, 3, 6, 6, generator=g)

    def forward(self, x, t, y):
        return self.patterns[y.long()].expand_as(x).clone()


def test_ag_drops_converged_rows_individually():
    model = Patterns()
    # row 0: cond == uncond (cosine 1, switches at once); rows 1, 2: never agree
    y, y_null = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])
    ref, _ = _run(model, y=y, y_null=y_null)
    ag = AdaptiveGuidance(0.99)
    out, info = _run(model, [ag], y=y, y_null=y_null)
    assert ag.switched_at.tolist() == [0, -1, -1]
    assert info["nfe"] == 8 and info["nfe_per_sample"] == pytest.approx((8 * 3 + 3 + 7 * 2) / 3)
    # rows that keep guidance are the CFG rows; row 0 is exact too (its branches agree)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_ag_batch_mode_waits_for_every_row():
    model = Patterns()
    y, y_null = torch.tensor([0, 1]), torch.tensor([0, 0])
    ag = AdaptiveGuidance(0.99, per_sample=False)
    _, info = _run(model, [ag], y=y, y_null=y_null)
    assert info["nfe_per_sample"] == 16 and ag.switched_at.tolist() == [-1, -1]


def test_ag_switch_changes_the_output_and_saves_evaluations():
    model = TinyDenoiser()
    y, y_null = torch.tensor([0.3, 0.5]), torch.tensor([0.0, 0.0])
    ref, ref_info = _run(model, y=y, y_null=y_null)
    ag = AdaptiveGuidance(0.95, start=0.25)
    out, info = _run(model, [ag], y=y, y_null=y_null)
    assert (ag.switched_at >= 2).all()  # not before start
    assert info["nfe_per_sample"] < ref_info["nfe_per_sample"]
    assert not torch.equal(out, ref)


class HalfUncond(torch.nn.Module):
    """pred_uncond = 0.5 pred_cond exactly (y == 0 is the null label)."""

    def __init__(self):
        super().__init__()
        self.net = TinyDenoiser()

    def forward(self, x, t, y):
        return self.net(x, t) * torch.where(y == 0, 0.5, 1.0)[:, None, None, None]


@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m"])
def test_linear_ag_selecting_the_true_uncond_equals_cfg(method):
    model = HalfUncond()
    y = torch.tensor([1.0, 2.0, 3.0])
    ref, ref_info = _run(model, method=method, y=y)
    coeffs = {i: [0.5, 0.0, 0.0] for i in range(1, 8)}
    lag = LinearAG(coeffs, history=1, num_steps=8, steps=range(1, 8))
    out, info = _run(model, [lag], method=method, y=y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert info["nfe_per_sample"] == 9 and ref_info["nfe_per_sample"] == 16


def test_linear_ag_checks_its_inputs():
    with pytest.raises(ValueError, match="must hold 3 values"):
        LinearAG({1: [1.0]}, history=1)
    with pytest.raises(ValueError, match="no history"):
        LinearAG({0: [1.0, 0.0, 0.0]}, history=1)
    with pytest.raises(ValueError, match="no coefficients"):
        LinearAG({1: [1.0, 0.0, 0.0]}, history=1, steps=[2])
    lag = LinearAG({1: [1.0, 0.0, 0.0]}, history=1, num_steps=4)
    with pytest.raises(ValueError, match="fitted for 4 steps"):
        _run(TinyDenoiser(), [lag], steps=8)


def test_fit_recovers_exact_coefficients():
    g = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(3):
        conds = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(6)]
        unconds = [torch.randn(4, 5, generator=g, dtype=torch.float64)]
        for i in range(1, 6):
            unconds.append(0.3 * conds[i] + 0.2 * conds[i - 1] + 0.5 * unconds[i - 1])
        trajectories.append((conds, unconds))
    coeffs = fit_linear_ag(trajectories, history=1)
    assert sorted(coeffs) == [1, 2, 3, 4, 5]
    for c in coeffs.values():
        assert c == pytest.approx([0.3, 0.2, 0.5], abs=1e-6)


def _tiny_dit():
    return tiny_dit(perturb=0.05, learn_sigma=False)


def test_calibrate_save_load_roundtrip(tmp_path):
    model = _tiny_dit()
    labels = torch.arange(4)
    coeffs = calibrate_linear_ag(
        model, labels, torch.full_like(labels, 10), method="ddim", steps=6, guidance_scale=2.0,
        prediction="eps", schedule=VPSchedule(), history=1, batches=2,
    )  # fmt: skip
    path = tmp_path / "lag.json"
    save_linear_ag(path, coeffs, history=1, num_steps=6)
    assert json.loads(path.read_text())["method"] == "linear-ag"
    lag = load_linear_ag(path)
    assert lag.coefficients == coeffs and lag.steps == {2}
    x, info = sample(
        model, (4, 4, 8, 8), method="ddim", steps=6, guidance_scale=2.0,
        cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)}, accelerators=[lag],
        progress=False, return_info=True,
    )  # fmt: skip
    assert info["nfe_per_sample"] == 11 and torch.isfinite(x).all()


def test_calibrate_cli_writes_linear_ag_coefficients(tmp_path):
    out = tmp_path / "lag.json"
    args = ["calibrate", "--method", "linear-ag", "--model", "DiT-tiny/2", "--steps", "6",
            "--runs", "2", "--guidance", "2", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    lag = load_linear_ag(out)
    assert lag.num_steps == 6 and sorted(lag.coefficients) == [1, 2, 3, 4, 5]


class Branches(Accelerator):
    """Both branches' predictions of every step (float64), as the model returned them."""

    def on_sample_start(self, ctx):
        self.cond, self.uncond = [], []

    def after_model(self, step, pred):
        self.cond.append(step.branch_preds["cond"].double())
        self.uncond.append(step.branch_preds["uncond"].double())
        return pred


def _distinct_branches_dit():
    """A flow DiT whose conditional and unconditional predictions differ by 20-30 %: a label
    embedding of real magnitude (the init's 0.02 makes the branches differ by ~1 %)."""
    model = real_dit(learn_sigma=False)
    with torch.no_grad():
        model.y_embedder.embedding_table.weight.mul_(10.0)
    return model


def _draw(model, seed, accelerators=()):
    labels = torch.arange(4)
    return sample(
        model, (4, 4, 8, 8), method="euler", steps=8, guidance_scale=2.0, cond={"y": labels},
        uncond={"y": torch.full_like(labels, 10)}, prediction="flow",
        accelerators=list(accelerators), progress=False,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def test_calibrated_coefficients_are_the_least_squares_solution():
    model = _distinct_branches_dit()
    labels = torch.arange(4)
    coeffs = calibrate_linear_ag(
        model, labels, torch.full_like(labels, 10), method="euler", steps=8, guidance_scale=2.0,
        prediction="flow", history=1, batches=2, seed=0,
    )  # fmt: skip
    runs = []
    for seed in (0, 1):  # the calibration's noise: seeds seed + batch
        spy = Branches()
        _draw(model, seed, [spy])
        runs.append(spy)
    for i in range(1, 8):
        diff = min(rel_err(r.cond[i], r.uncond[i]) for r in runs)
        assert diff > 0.2, (i, diff)  # the branches really differ
        # u_i ~ a0 c_i + a1 c_{i-1} + b1 u_{i-1}, over every element of both runs
        X = torch.cat([torch.stack([r.cond[i].flatten(), r.cond[i - 1].flatten(),
                                    r.uncond[i - 1].flatten()], 1) for r in runs])  # fmt: skip
        y = torch.cat([r.uncond[i].flatten() for r in runs])
        want = torch.linalg.lstsq(X, y[:, None]).solution.flatten()
        torch.testing.assert_close(torch.tensor(coeffs[i], dtype=torch.float64), want,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
    assert sorted(coeffs) == list(range(1, 8))

    # On fresh noise, the fitted estimate beats the naive ones on the same steps: the last
    # step's unconditional prediction reused, and no guidance (u = c).
    ref, steps = _draw(model, 5), [2, 4, 6]
    err = {}
    for name, c in [("fit", coeffs), ("last_uncond", {i: [0.0, 0.0, 1.0] for i in steps}),
                    ("no_guidance", {i: [1.0, 0.0, 0.0] for i in steps})]:  # fmt: skip
        out = _draw(model, 5, [LinearAG(c, history=1, num_steps=8, steps=steps)])
        err[name] = rel_err(out, ref)
    # measured 0.018, 0.033, 0.085
    assert err["fit"] < err["last_uncond"] / 1.5 and err["fit"] < err["no_guidance"] / 3, err
