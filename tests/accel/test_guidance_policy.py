"""Static per-step guidance policies (cfg / cond / linear) and their search."""

import json

import pytest
import torch

from adaptdiff import accel, cli
from adaptdiff.accel.cli import random_dit
from adaptdiff.accel.guidance.adaptive import AdaptiveGuidance, LinearAG
from adaptdiff.accel.guidance.policy import (
    GuidancePolicy,
    GuidancePolicyConfig,
    load_guidance_policy,
    policy_evaluations,
    psnr_fitness,
    save_guidance_policy,
    search_guidance_policy,
)
from adaptdiff.accel.steps.sada import SADA
from adaptdiff.samplers import Accelerator, sample
from tests.samplers.support import TinyDenoiser

from .support import tiny_dit

STEPS = 8
Y, Y_NULL = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)


def _run(model, accelerators=(), method="euler", steps=STEPS, guidance=3.0, uncond=True, **kw):
    return sample(
        model, (3, 3, 6, 6), method=method, steps=steps, guidance_scale=guidance,
        cond={"y": Y}, uncond={"y": Y_NULL} if uncond else None, accelerators=accelerators,
        progress=False, generator=torch.Generator().manual_seed(0), return_info=True, **kw,
    )  # fmt: skip


class HalfUncond(torch.nn.Module):
    """pred_uncond = 0.5 pred_cond exactly (y == 0 is the null label); records its batch sizes."""

    def __init__(self):
        super().__init__()
        self.net = TinyDenoiser()
        self.batches: list[int] = []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.net(x, t) * torch.where(y == 0, 0.5, 1.0)[:, None, None, None]


EXACT = {i: [0.5, 0.0, 0.0] for i in range(1, STEPS)}  # u_i = 0.5 c_i: HalfUncond's truth


@pytest.mark.parametrize("method", ["euler", "ddim", "dpmpp_2m", "heun"])
def test_all_cfg_is_plain_cfg_bit_for_bit(method):
    model = TinyDenoiser()
    ref, ref_info = _run(model, method=method)
    out, info = _run(model, [GuidancePolicy(["cfg"] * STEPS)], method=method)
    assert torch.equal(out, ref)
    assert info["nfe_per_sample"] == ref_info["nfe_per_sample"] == 2 * ref_info["nfe"]


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m", "heun"])
def test_all_cond_is_conditional_only_bit_for_bit(method):
    model = TinyDenoiser()
    ref, ref_info = _run(model, method=method, guidance=1.0, uncond=False)
    out, info = _run(model, [GuidancePolicy(["cond"] * STEPS)], method=method)
    cfg, _ = _run(model, method=method)
    assert torch.equal(out, ref) and not torch.equal(out, cfg)
    assert info["nfe_per_sample"] == ref_info["nfe_per_sample"] == ref_info["nfe"]


def test_unconditional_rows_leave_the_batch_on_cond_and_linear_steps():
    model = HalfUncond()
    policy = ("cfg", "cond", "linear", "cfg", "linear", "cond", "cond", "cfg")
    _, info = _run(model, [GuidancePolicy(policy, coefficients=EXACT)])
    assert model.batches == [6 if c == "cfg" else 3 for c in policy]
    assert info["nfe_per_sample"] == policy_evaluations(policy) == 11
    assert [r["branches"] for r in info["records"]] == [
        ("cond", "uncond") if c == "cfg" else ("cond",) for c in policy
    ]


def test_mixed_policy_equals_its_steps_done_by_hand():
    """Each step's guided prediction is what its choice says: CFG, the conditional one, or
    LinearAG's estimate (here the exact one, so "linear" equals CFG)."""
    model = HalfUncond()
    ref, _ = _run(model)
    policy = ["cfg"] + ["linear"] * (STEPS - 1)
    out, info = _run(model, [GuidancePolicy(policy, coefficients=EXACT)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert info["nfe_per_sample"] == STEPS + 1
    # against LinearAG estimating the same steps: the same arithmetic, bit for bit
    lag, _ = _run(model, [LinearAG(EXACT, history=1, num_steps=STEPS, steps=range(1, STEPS))])
    assert torch.equal(out, lag)
    # a "cond" step differs from CFG by exactly that step's missing guidance
    cond_at_3 = ["cfg"] * 3 + ["cond"] + ["cfg"] * 4
    out3, _ = _run(model, [GuidancePolicy(cond_at_3)])

    class ScaleOne(Accelerator):  # the same by a guidance scale of 1 at step 3
        def before_model(self, step):
            if step.index == 3:
                step.guidance_scale = 1.0

    by_hand, _ = _run(model, [ScaleOne()])
    torch.testing.assert_close(out3, by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(out3, ref, atol=1e-4)


def test_wrong_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match=r"policy\[1\] must be one of"):
        GuidancePolicy(["cfg", "uncond"])
    with pytest.raises(ValueError, match="must not be empty"):
        GuidancePolicy([])
    with pytest.raises(ValueError, match="sequence of"):
        GuidancePolicy("cfg")
    with pytest.raises(ValueError, match=r"'linear' steps \[1\].*coefficients"):
        GuidancePolicy(["cfg", "linear"])
    with pytest.raises(ValueError, match="steps before 1 have no history"):
        GuidancePolicy(["linear", "cfg"], coefficients={0: [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="step 2 has no coefficients"):
        GuidancePolicy(["cfg", "cfg", "linear"], coefficients={1: [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match=r"coefficients\[1\] must hold 3 values"):
        GuidancePolicy(["cfg", "linear"], coefficients={1: [1.0]})
    with pytest.raises(ValueError, match=r"GuidancePolicyConfig: policy\[0\]"):
        GuidancePolicyConfig(("CFG",))
    with pytest.raises(ValueError, match="leave them None with a path"):
        GuidancePolicyConfig("policy.json", history=1)
    # a policy of another length than the run's steps
    with pytest.raises(ValueError, match="GuidancePolicy was written for 8 steps .* 6 steps"):
        _run(TinyDenoiser(), [GuidancePolicy(["cfg"] * 8)], steps=6)


def test_through_accel_apply_and_a_file(tmp_path):
    model = tiny_dit()
    labels = torch.tensor([1, 2])
    coeffs = {i: [0.6, 0.1, 0.3] for i in range(1, STEPS)}
    policy = ("cfg", "cfg", "linear", "cond", "linear", "cfg", "cond", "cond")

    def draw(accelerators):
        return sample(
            model, (2, 4, 8, 8), method="euler", steps=STEPS, guidance_scale=1.5,
            cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)}, prediction="flow",
            accelerators=accelerators, progress=False, return_info=True,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    ref, _ = draw([GuidancePolicy(policy, coefficients=coeffs)])
    handle = accel.apply(model, GuidancePolicyConfig(policy, coefficients=coeffs))
    out, info = draw([handle])
    summary = accel.summary(model)["default"]["guidance_policy"]
    accel.remove(model)
    assert torch.equal(out, ref) and info["nfe_per_sample"] == policy_evaluations(policy) == 11
    assert summary == {"policy": list(policy), "evaluations": 11}
    path = tmp_path / "policy.json"
    save_guidance_policy(path, policy, coefficients=coeffs, history=1, psnr=30.0)
    assert json.loads(path.read_text())["method"] == "guidance-policy"
    assert load_guidance_policy(path).policy == policy
    handle = accel.apply(model, GuidancePolicyConfig(str(path)))
    out_file, _ = draw([handle])
    accel.remove(model)
    assert torch.equal(out_file, ref)
    (tmp_path / "other.json").write_text(json.dumps({"method": "linear-ag"}))
    with pytest.raises(ValueError, match="not a guidance-policy file"):
        load_guidance_policy(tmp_path / "other.json")


def test_composition_per_compose_plan():
    model = HalfUncond()
    cond_only = GuidancePolicy(["cfg"] * 4 + ["cond"] * 4)
    linear = GuidancePolicy(["cfg"] + ["linear"] * 7, coefficients=EXACT)
    with pytest.raises(ValueError, match="AdaptiveGuidance cannot be combined with GuidancePolicy"):
        _run(model, [AdaptiveGuidance(0.99), cond_only])
    with pytest.raises(ValueError, match="both replace unconditional evaluations"):
        _run(model, [cond_only, LinearAG(EXACT, num_steps=STEPS)])
    with pytest.raises(ValueError, match="GuidancePolicy cannot be combined with method 'heun'"):
        _run(model, [linear], method="heun")
    with pytest.raises(ValueError, match="uses every step's computed predictions and SADA"):
        _run(model, [SADA(start=0.0, end=1.0), linear])
    # cfg/cond policies run with Heun (both calls of a step share its choice) and with SADA
    model.batches.clear()
    _, info = _run(model, [cond_only], method="heun")
    assert model.batches == [6, 6, 6, 6, 6, 6, 6, 6, 3, 3, 3, 3, 3, 3, 3]
    assert info["nfe"] == 15
    out, info = _run(model, [SADA(start=0.0, end=1.0), cond_only])
    assert torch.isfinite(out).all() and info["nfe"] <= STEPS


# --------------------------------------------------------------------------- search


def test_search_finds_the_known_best_policy_on_a_constructed_case():
    """u = 0.5 c exactly; the LinearAG coefficients are exact except at steps 3 and 6 (badly
    wrong), and "cond" drops guidance. With three CFG steps affordable (budget N + 3), the one
    policy that reproduces CFG is cfg at 0 (no history), 3 and 6, linear elsewhere. (Flow
    matching: every step's velocity stays in the final sample.)"""
    model = HalfUncond()
    coeffs = {**EXACT, 3: [2.0, 0.0, 0.0], 6: [2.0, 0.0, 0.0]}
    ref, _ = _run(model, prediction="flow")

    def run(accelerators):
        return _run(model, accelerators, prediction="flow")[0]

    calls = []
    fit = psnr_fitness(run, ref, coefficients=coeffs)

    def fitness(policy):
        calls.append(policy)
        return fit(policy)

    res = search_guidance_policy(fitness, STEPS, STEPS + 3, trials=80, seed=0)
    best = ("cfg", "linear", "linear", "cfg", "linear", "linear", "cfg", "linear")
    assert res.policy == best and res.evaluations == 11
    assert res.fitness == float("inf")  # LinearAG's exact estimate is CFG bit for bit
    runner_up = sorted(f for p, f in res.scored if p != best)[-1]
    assert runner_up < 50, runner_up  # measured 42.2 dB: every other policy is far from CFG
    assert len(calls) == len(res.scored) <= 80 and len(set(calls)) == len(calls)


def test_search_respects_its_budgets_and_is_deterministic():
    target = ("cfg", "cond", "linear", "cfg", "cond", "linear", "cond", "cond", "linear", "cfg")

    def fitness(policy):  # the closer to the target, the better
        return -sum(a != b for a, b in zip(policy, target, strict=True))

    runs = [search_guidance_policy(fitness, 10, 13, trials=60, seed=s) for s in (3, 3, 4)]
    a, b, c = runs
    assert a.scored == b.scored and a.policy == b.policy
    assert c.scored != a.scored  # another seed searches otherwise
    for r in runs:
        assert len(r.scored) == 60
        assert all(policy_evaluations(p) <= 13 for p, _ in r.scored)
        assert r.fitness == max(f for _, f in r.scored)
    full = search_guidance_policy(fitness, 10, 13, trials=400, seed=0)
    assert full.policy == target and full.evaluations == 13
    # "linear" only where allowed; choices restrict the search space
    lim = search_guidance_policy(fitness, 10, 12, choices=("cfg", "cond"), trials=30, seed=0)
    assert all(set(p) <= {"cfg", "cond"} and policy_evaluations(p) <= 12 for p, _ in lim.scored)
    lin = search_guidance_policy(fitness, 10, 10, linear_steps={2, 5}, trials=30, seed=0)
    for p, _ in lin.scored:
        assert {i for i, x in enumerate(p) if x == "linear"} <= {2, 5} and "cfg" not in p


def test_search_checks_its_arguments():
    def f(p):
        return 0.0

    with pytest.raises(ValueError, match=r"budget must be an int in \[8, 16\]"):
        search_guidance_policy(f, 8, 7)
    with pytest.raises(ValueError, match=r"budget must be an int in \[8, 16\]"):
        search_guidance_policy(f, 8, 17)
    with pytest.raises(ValueError, match="choices must be in"):
        search_guidance_policy(f, 8, 10, choices=("cfg", "skip"))
    with pytest.raises(ValueError, match="no policy fits budget 8"):
        search_guidance_policy(f, 8, 8, choices=("cfg", "linear"))
    with pytest.raises(ValueError, match="trials must be"):
        search_guidance_policy(f, 8, 10, trials=0)
    with pytest.raises(ValueError, match="has 3 steps, not 8"):
        search_guidance_policy(f, 8, 10, initial=[("cfg", "cfg", "cfg")])


def test_calibrate_cli_searches_a_runnable_policy(tmp_path):
    out = tmp_path / "policy.json"
    args = ["calibrate", "--method", "guidance-policy", "--model", "DiT-tiny/2", "--steps", "6",
            "--runs", "2", "--guidance", "2", "--option", "budget=8", "--option", "trials=12",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == "guidance-policy" and doc["format"] == "adaptdiff.calibration"
    assert len(doc["policy"]) == 6 and doc["evaluations"] <= 8 and doc["trials"] == 12
    assert sorted(int(i) for i in doc["coefficients"]) == [1, 2, 3, 4, 5]
    model = random_dit("DiT-tiny/2", seed=0)
    labels = torch.arange(2)
    handle = accel.apply(model, GuidancePolicyConfig(str(out)))
    _, info = sample(
        model, (2, 4, 8, 8), method="euler", steps=6, guidance_scale=2.0, cond={"y": labels},
        uncond={"y": torch.full_like(labels, model.null_label)}, prediction="flow",
        accelerators=[handle], progress=False, return_info=True,
    )  # fmt: skip
    accel.remove(model)
    assert info["nfe_per_sample"] == doc["evaluations"]


def test_comparison_with_the_cosine_rule_runs_at_equal_evaluations():
    from adaptdiff.accel.guidance.compare import compare, summarize

    record = compare(steps=4, batch=2, thresholds=(0.95,), seeds=(0, 1), trials=4, log=None)
    rows = record["rows"]
    assert [(r["seed"], r["method"]) for r in rows] == [
        (s, m) for s in (0, 1) for m in ("AG", "truncation", "searched", "searched-cond")
    ]
    for s in (0, 1):
        ag, trunc, found, found_cond = (r for r in rows if r["seed"] == s)
        assert found["evals"] <= ag["evals"] and trunc["evals"] <= ag["evals"]
        assert found["evals"] == policy_evaluations(found["policy"])
        assert found_cond["evals"] == policy_evaluations(found_cond["policy"]) <= ag["evals"]
        assert "linear" not in found_cond["policy"]
    stats = {r["method"]: r for r in summarize(rows)}
    assert stats["AG"]["n"] == 2 and len(stats["searched"]["psnr"]) == 2


def test_inside_a_diffusers_pipeline():
    """In SD3's own loop: all-cfg is the plain pipeline bit for bit; the transformer runs the
    cond rows alone on "cond" and "linear" steps."""
    pytest.importorskip("diffusers")
    from adaptdiff.bench.pipelines import SIZES, build_pipeline

    from .test_pipelines import _Calls
    from .test_pipelines import _run as run_pipe

    steps = SIZES["tiny"]["steps"]
    pipe, kw = build_pipeline("sd3")
    plain = run_pipe(pipe, kw)
    accel.apply(pipe, GuidancePolicyConfig(("cfg",) * steps))
    try:
        assert torch.equal(run_pipe(pipe, kw), plain)
    finally:
        accel.remove(pipe)
    policy = ("cfg", "cond", "linear") + ("cfg",) * (steps - 3)
    cfg = GuidancePolicyConfig(policy, coefficients={2: [0.5, 0.3, 0.2]})
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, cfg)
    try:
        out = run_pipe(pipe, kw)
    finally:
        batches.close()
        accel.remove(pipe)
    assert batches.sizes == [2 if c == "cfg" else 1 for c in policy]
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
