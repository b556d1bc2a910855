"""Guidance with text prompts and negative prompts: ``sample``'s cond/uncond keyword arguments
carry a :class:`TextDiT`'s tokens (or a cross-attention DiT's ``encoder_hidden_states``)."""

import dataclasses

import pytest
import torch

from adaptdiff.accel.guidance import AdaptiveGuidance, LinearAG, TrajectoryRecorder, fit_linear_ag
from adaptdiff.models import DIT_CONFIGS, create_dit
from adaptdiff.models.text_encoder import TextDiT, TextEncoderConfig
from adaptdiff.samplers import FlowSchedule, sample

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 4, 8, 8)
PROMPTS = ["a two", "a bold seven", "a thin, slanted one"]


def _model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(DIT_CONFIGS["DiT-tiny/2"], num_classes=0, time_scale=1000.0)
    model = TextDiT(cfg, TextEncoderConfig(width=16, num_heads=2, depth=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open the zero-initialised gates and projections
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _sample(model, **kw):
    kw.setdefault("steps", 4)
    return sample(
        model, torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)), method="euler",
        prediction="flow", schedule=FlowSchedule(), progress=False, **kw,
    )  # fmt: skip


@torch.no_grad()
def test_cfg_with_a_negative_prompt_is_the_two_pass_formula():
    model = _model()
    cond, uncond = model.prompt_kwargs(PROMPTS, ["a three", "a seven", "a one"])
    w = 4.0
    got = _sample(model, guidance_scale=w, cond=cond, uncond=uncond)

    def two_pass(x, t):
        pc = model(x, t, **cond)
        pu = model(x, t, **uncond)
        return pu + w * (pc - pu)

    want = _sample(two_pass)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the negative prompt matters: guidance against the empty prompt gives other samples
    _, empty = model.prompt_kwargs(PROMPTS)
    other = _sample(model, guidance_scale=w, cond=cond, uncond=empty)
    assert (other - got).abs().max() > 1e-3


@torch.no_grad()
def test_cfg_on_encoder_hidden_states_of_a_plain_cross_attention_dit():
    torch.manual_seed(0)
    dit = create_dit("DiT-tiny/2", num_classes=0, cross_attention_dim=6, time_scale=1000.0)
    for b in dit.blocks:
        torch.nn.init.normal_(b.cross_attn.proj.weight, std=0.3)
        torch.nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.3)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.3)
    dit.eval()
    g = torch.Generator().manual_seed(2)
    pos = {"encoder_hidden_states": torch.randn(3, 4, 6, generator=g)}
    neg = {
        "encoder_hidden_states": torch.randn(3, 4, 6, generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool),
    }
    pos["encoder_attention_mask"] = torch.ones(3, 4, dtype=torch.bool)
    got = _sample(dit, guidance_scale=3.0, cond=pos, uncond=neg)

    def two_pass(x, t):
        pu = dit(x, t, **neg)
        return pu + 3.0 * (dit(x, t, **pos) - pu)

    torch.testing.assert_close(got, _sample(two_pass), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_adaptive_guidance_with_prompts_switches_to_the_prompt_alone():
    model = _model()
    cond, uncond = model.prompt_kwargs(PROMPTS, "a five")
    w = 3.0
    ag = AdaptiveGuidance(threshold=-1.0)  # every sample switches after the first step
    got, info = _sample(
        model, guidance_scale=w, cond=cond, uncond=uncond, accelerators=[ag], return_info=True
    )
    assert ag.switched_at.tolist() == [0, 0, 0]
    assert [r["branches"] for r in info["records"]] == [("cond", "uncond")] + [("cond",)] * 3
    calls = []

    def by_hand(x, t):
        calls.append(1)
        pc = model(x, t, **cond)
        if len(calls) > 1:
            return pc
        pu = model(x, t, **uncond)
        return pu + w * (pc - pu)

    torch.testing.assert_close(got, _sample(by_hand), atol=1e-5, rtol=1e-5)
    never = AdaptiveGuidance(threshold=2.0)  # never switches: plain CFG
    full = _sample(model, guidance_scale=w, cond=cond, uncond=uncond)
    torch.testing.assert_close(
        _sample(model, guidance_scale=w, cond=cond, uncond=uncond, accelerators=[never]), full
    )


@torch.no_grad()
def test_linear_ag_with_prompts_estimates_the_negative_branch():
    model = _model()
    steps = 6
    cond, uncond = model.prompt_kwargs(PROMPTS, ["a four", "a one", "a nine"])
    rec = TrajectoryRecorder()
    full = _sample(
        model, steps=steps, guidance_scale=2.0, cond=cond, uncond=uncond, accelerators=[rec]
    )
    coefficients = fit_linear_ag([(rec.cond, rec.uncond)], history=1)
    lag = LinearAG(coefficients, history=1, num_steps=steps)
    assert lag.steps  # some steps estimate the negative branch
    got, info = _sample(
        model, steps=steps, guidance_scale=2.0, cond=cond, uncond=uncond, accelerators=[lag],
        return_info=True,
    )  # fmt: skip
    skipped = [r["index"] for r in info["records"] if "uncond" not in r["branches"]]
    assert sorted(skipped) == sorted(lag.steps)
    # fitted on this very trajectory: the estimate is close, not exact
    assert (got - full).abs().max() < 0.5 * full.abs().max()
    assert torch.isfinite(got).all()
