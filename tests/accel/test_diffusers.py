"""Every method on diffusers transformers (DiT, PixArt, SD3, Flux) with tiny random weights,
called like a pipeline does: one call per step, cond and uncond in their own contexts."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    Schedule,
    ScheduleConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from adaptdiff.accel.caching.ecad import ecad_search
from adaptdiff.accel.caching.producers import (
    asdm_schedule,
    bac_schedule,
    collect_features,
    interval_schedule,
)

diffusers = pytest.importorskip("diffusers")

STEPS = 6
TIMES = torch.linspace(1.0, 0.1, STEPS)


def _dit():
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    )  # fmt: skip

    def inputs(x, t):
        return dict(
            hidden_states=x, timestep=(t * 999).long().repeat(2), class_labels=torch.tensor([1, 2])
        )

    return m, torch.randn(2, 4, 8, 8), inputs


def _pixart():
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16,
        norm_num_groups=1,
    )  # fmt: skip
    text = torch.randn(2, 5, 16)

    def inputs(x, t):
        return dict(
            hidden_states=x, encoder_hidden_states=text, timestep=(t * 999).repeat(2),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )  # fmt: skip

    return m, torch.randn(2, 4, 8, 8), inputs


def _sd3():
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
    )  # fmt: skip
    text, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)

    def inputs(x, t):
        return dict(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
            timestep=(t * 1000).repeat(2),
        )  # fmt: skip

    return m, torch.randn(2, 4, 8, 8), inputs


def _flux():
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    text, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(-1, 3)  # fmt: skip
    txt_ids = torch.zeros(5, 3)

    def inputs(x, t):
        return dict(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
            timestep=t.repeat(2), img_ids=img_ids, txt_ids=txt_ids,
        )  # fmt: skip

    return m, torch.randn(2, 16, 8), inputs


MODELS = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux}


def _build(name):
    torch.manual_seed(0)
    model, x, inputs = MODELS[name]()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised gates would make blocks identities
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), x, inputs


@torch.no_grad()
def _loop(model, x, inputs, contexts=("cond", "uncond")):
    """A pipeline's denoising loop: Euler steps on the mean of both branches' outputs
    (``accel.context`` is a no-op on a model without hooks)."""
    outs = []
    for i in range(STEPS):
        preds = []
        for name in contexts:
            with accel.context(model, name):
                out = model(**inputs(x, TIMES[i]), return_dict=False)[0]
            preds.append(out[:, : x.shape[1]])
        v = sum(preds) / len(preds)
        x = x - 0.1 * v
        outs.append(v)
    return torch.stack(outs)


def _methods(model):
    comps = accel.layout(model)
    return {
        "fbcache": FirstBlockCacheConfig(threshold=10.0),
        "dbcache": FirstBlockCacheConfig(threshold=10.0, first_blocks=1, last_blocks=1),
        "teacache": TeaCacheConfig(threshold=10.0),
        "magcache": MagCacheConfig(mag_ratios=[1.0] * STEPS, retention_ratio=0.2),
        "taylorseer": TaylorSeerConfig(interval=2, warmup_steps=2),
        "asdm_block": ScheduleConfig(asdm_schedule(comps, STEPS, "block", "alternate")),
        "asdm_unit": ScheduleConfig(asdm_schedule(comps, STEPS, "unit", "late", targets=[0, 2])),
        "interval": ScheduleConfig(interval_schedule(comps, STEPS, 2)),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_on_diffusers_model(name):
    model, x, inputs = _build(name)
    assert len(accel.find_blocks(model)) == 3
    comps = accel.layout(model)
    assert all(comps), comps
    plain = _loop(model, x, inputs)
    accel.apply(model, ScheduleConfig(Schedule.full(comps, STEPS)))
    assert torch.equal(_loop(model, x, inputs), plain)  # all-compute: bit-identical
    accel.remove(model)
    for method, cfg in _methods(model).items():
        accel.apply(model, cfg)
        out = _loop(model, x, inputs)
        s = accel.summary(model)
        accel.remove(model)
        assert torch.isfinite(out).all(), method
        assert set(s) == {"cond", "uncond"}, method
        assert s["cond"]["model_calls"] == STEPS
        assert s["cond"]["hits"] > 0, (method, s["cond"])
        assert not torch.equal(out, plain), method
    assert torch.equal(_loop(model, x, inputs), plain)  # removed cleanly


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_bac_and_ecad_on_diffusers_model(name):
    model, x, inputs = _build(name)
    comps = accel.layout(model)
    feats = collect_features(model, lambda: _loop(model, x, inputs, ("cond",)))
    sched = bac_schedule(comps, feats, budget=3, num_bu_blocks=1, final_steps=1)
    accel.apply(model, ScheduleConfig(sched))
    out = _loop(model, x, inputs, ("cond",))
    assert torch.isfinite(out).all() and accel.summary(model)["cond"]["hits"] > 0
    accel.remove(model)

    def sample_once(accelerators):  # a pipeline loop: ecad_search resets the handle itself
        return _loop(model, x, inputs, ("cond",))

    schedules, _ = ecad_search(model, sample_once, STEPS, pop_size=4, generations=1,
                               progress=False)  # fmt: skip
    assert schedules and all(s.meta["compute_fraction"] < 1 for s in schedules)


@pytest.mark.parametrize("last_blocks", [0, 1])
def test_a_skipped_step_adds_the_last_computed_residuals_on_joint_blocks(last_blocks):
    # SD3's joint blocks carry two streams; a skipped middle adds the cached residual of each
    # (the last block keeps no text stream: context_pre_only).
    model, x, inputs = _build("sd3")
    blocks = model.transformer_blocks
    mid_last = len(blocks) - 1 - last_blocks
    ins, outs = [], []
    hooks = [
        blocks[1].register_forward_pre_hook(
            lambda m, a, kw: ins.append((kw["hidden_states"], kw["encoder_hidden_states"])),
            with_kwargs=True,
        ),
        blocks[mid_last].register_forward_hook(lambda m, a, out: outs.append(out)),
    ]
    accel.apply(model, FirstBlockCacheConfig(threshold=10.0, last_blocks=last_blocks))
    _loop(model, x, inputs)
    s = accel.summary(model)
    accel.remove(model)
    for h in hooks:
        h.remove()
    assert len(ins) == len(outs) == 2 * STEPS
    for c, context in enumerate(("cond", "uncond")):
        skipped = s[context]["cached_steps"]
        assert len(skipped) >= 3, skipped
        res = None
        for step in range(STEPS):
            (h_in, e_in), (e_out, h_out) = ins[2 * step + c], outs[2 * step + c]
            if step in skipped:
                assert torch.equal(h_out, h_in + res[0]), (context, step)
                if res[1] is not None:
                    assert torch.equal(e_out, e_in + res[1]), (context, step)
            else:
                res = (h_out - h_in, None if e_out is None else e_out - e_in)
                assert res[0].norm() > 0.01 * h_in.norm()
        assert (res[1] is None) == (last_blocks == 0)
