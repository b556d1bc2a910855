"""accel.apply on real diffusers pipelines (DiT, PixArt-Sigma, SD3, Flux, Sana) with tiny random
weights: every pipe(...) call is one clean sampling run, the methods act inside the pipeline's own
loop, remove restores the pipeline exactly."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.caching.producers import interval_schedule
from adaptdiff.accel.pipelines import driving
from adaptdiff.metrics import psnr
from adaptdiff.samplers import Accelerator

diffusers = pytest.importorskip("diffusers")

from adaptdiff.bench.pipelines import FAMILIES, SIZES, build_pipeline  # noqa: E402

from .support import ReusePrediction  # noqa: E402

STEPS = SIZES["tiny"]["steps"]


def _run(pipe, kw, seed=0, **extra):
    out = pipe(**{**kw, **extra}, generator=torch.Generator().manual_seed(seed))
    return out.images


class _Calls:
    """The batch size and output of every call the transformer really makes: an instance
    ``forward`` installed before ``accel.apply``, so the pipeline driver calls it inside."""

    def __init__(self, module):
        self.module, self.sizes, self.outs = module, [], []
        inner = module.forward

        def forward(*args, **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.sizes.append(x.shape[0])
            out = inner(*args, **kwargs)
            self.outs.append(out[0] if isinstance(out, tuple) else out.sample)
            return out

        module.forward = forward

    def close(self):
        del self.module.__dict__["forward"]


def _plain_state(pipe):
    return type(pipe), dict(pipe.transformer.__dict__)


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_configs_give_the_plain_pipeline_exactly(family):
    pipe, kw = build_pipeline(family)
    plain = _run(pipe, kw)
    handle = accel.apply(
        pipe,
        accel.FirstBlockCacheConfig(threshold=0.0),
        accel.AdaptiveGuidanceConfig(threshold=1.5),
        accel.SADAConfig(criterion="off"),
    )
    try:
        assert isinstance(handle, accel.PipelineHandle)
        assert type(pipe).__name__ == type(pipe).__mro__[1].__name__  # same name, subclass
        assert torch.equal(_run(pipe, kw), plain)
        call = accel.summary(pipe)["calls"][-1]
        assert call["steps"] == STEPS and call["rows"] == call["rows_plain"]
        assert call["skipped_steps"] == [] and call["uncond_rows_dropped"] == 0
    finally:
        accel.remove(pipe)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_call_starts_clean_and_remove_restores(family):
    pipe, kw = build_pipeline(family)
    plain = _run(pipe, kw)  # (diffusers adds its hook registry at the first cache_context)
    cls, attrs = _plain_state(pipe)
    handle = accel.apply(pipe, accel.FirstBlockCacheConfig(threshold=0.3))
    try:
        assert "no call yet" in str(handle)
        with pytest.raises(ValueError, match="already has adaptdiff.accel hooks"):
            accel.apply(pipe, accel.FirstBlockCacheConfig())
        a, b = _run(pipe, kw), _run(pipe, kw)
        calls = accel.summary(pipe)["calls"]
        assert torch.equal(a, b)
        assert not torch.equal(a, plain)  # the cache acted
        cached = [
            [ctx["cached_steps"] for ctx in c["contexts"].values()] for c in calls
        ]  # per call: step indices of this generation, the same both times
        assert cached[0] == cached[1] and any(cached[0])
        assert all(max(s, default=0) < STEPS for s in cached[0])
        one_line = accel.summary(pipe, text=True)
        assert one_line == str(accel.get_handle(pipe)) and f"{STEPS} steps" in one_line
    finally:
        accel.remove(pipe)
    assert type(pipe) is cls and dict(pipe.transformer.__dict__) == attrs
    assert torch.equal(_run(pipe, kw), plain)


def test_step_schedule_same_image_on_every_call():
    """The reported bug: a static schedule on a pipeline gave another image on the 2nd call."""
    pipe, kw = build_pipeline("dit")
    comps = accel.layout(pipe.transformer)
    accel.apply(pipe, accel.ScheduleConfig(interval_schedule(comps, STEPS, 2)))
    try:
        a, b = _run(pipe, kw), _run(pipe, kw)
        assert torch.equal(a, b)
        s = accel.summary(pipe)["calls"]
        assert s[0]["contexts"] == s[1]["contexts"]
        assert s[0]["contexts"]["default"]["hits"] > 0
        assert s[0]["contexts"]["default"]["model_calls"] == STEPS
    finally:
        accel.remove(pipe)


def _diffusers_fbc_skips(pipe, kw, threshold, separate):
    """Step indices (per context) at which diffusers' own first-block cache skipped."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    t = pipe.transformer
    apply_first_block_cache(t, FirstBlockCacheConfig(threshold=threshold))
    blocks = accel.find_blocks(t)
    second = getattr(blocks[1][1], accel.find_components(blocks[1][1])[0])
    seen = []
    branch = {"name": "default"}
    if separate:
        original = t.cache_context

        def cache_context(name):
            branch["name"] = name
            return original(name)

        t.cache_context = cache_context
    h1 = t.register_forward_pre_hook(lambda m, a: seen.append([branch["name"], False]))
    h2 = second.register_forward_pre_hook(lambda m, a: seen[-1].__setitem__(1, True))
    try:
        if not separate:  # one context for the whole run, as diffusers needs one
            _set_cache_context(t, CacheContext("default"))
        _run(pipe, kw)
    finally:
        h1.remove()
        h2.remove()
        if separate:
            del t.cache_context
        else:
            _set_cache_context(t, None)
        registry = HookRegistry.check_if_exists_or_initialize(t)
        for name in ("fbc_leader_block_hook", "fbc_block_hook"):
            registry.remove_hook(name, recurse=True)
    skips: dict = {}
    index: dict = {}
    for name, ran in seen:
        i = index.get(name, 0)
        index[name] = i + 1
        skips.setdefault(name, [])
        if not ran:
            skips[name].append(i)
    return skips


# Not on Sana: diffusers' first-block cache does not know its blocks ("SanaTransformerBlock not
# registered"); not on SD3: it fails on SD3's last block, which returns no encoder stream
# ("unsupported operand type(s) for -: 'NoneType' and 'Tensor'", diffusers 0.42).
@pytest.mark.parametrize("family", ["dit", "pixart", "flux"])
def test_first_block_cache_skips_the_steps_diffusers_skips(family):
    pipe, kw = build_pipeline(family)
    if family != "flux":  # one row per call, as diffusers' indicator is over the whole batch
        kw["guidance_scale"] = 1.0
    separate = family == "flux"  # Flux's true CFG: cond and uncond calls in their contexts
    acted = []
    for threshold in (0.05, 0.2, 0.5):
        theirs = _diffusers_fbc_skips(pipe, kw, threshold, separate)
        accel.apply(pipe, accel.FirstBlockCacheConfig(threshold=threshold))
        try:
            _run(pipe, kw)
            ctxs = accel.summary(pipe)["calls"][-1]["contexts"]
        finally:
            accel.remove(pipe)
        ours = {name: c["cached_steps"] for name, c in ctxs.items()}
        assert ours == theirs, (threshold, ours, theirs)
        acted.append(any(ours.values()))
    assert any(acted), "no threshold made either cache skip: the comparison says nothing"


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_guidance_drops_uncond_rows_from_the_transformer_batch(family):
    pipe, kw = build_pipeline(family, batch=2)
    plain = _run(pipe, kw)
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, accel.AdaptiveGuidanceConfig(threshold=-1.0))  # switch after step 0
    try:
        out = _run(pipe, kw)
        call = accel.summary(pipe)["calls"][-1]
    finally:
        batches.close()
        accel.remove(pipe)
    if family == "flux":  # separate calls: cond and uncond at step 0, then cond only
        assert batches.sizes == [2, 2] + [2] * (STEPS - 1)
    else:
        assert batches.sizes == [4] + [2] * (STEPS - 1)
    assert call["uncond_rows_dropped"] == 2 * (STEPS - 1)
    assert call["rows"] == 4 + 2 * (STEPS - 1) and call["rows_plain"] == 4 * STEPS
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_after_the_switch_the_scheduler_gets_the_cond_prediction(family):
    """AG switched at step 0: from step 1 on, the pipeline's own guidance must hand its
    scheduler exactly the transformer's (cond-only) prediction."""
    pipe, kw = build_pipeline(family)
    stepped = []
    calls = _Calls(pipe.transformer)
    original_step = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        stepped.append(model_output)
        return original_step(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    accel.apply(pipe, accel.AdaptiveGuidanceConfig(threshold=-1.0))
    try:
        _run(pipe, kw)
    finally:
        accel.remove(pipe)
        calls.close()
        del pipe.scheduler.step
    outs = calls.outs
    first = 2 if family == "flux" else 1  # the transformer calls of step 0
    assert len(outs) == first + STEPS - 1 and len(stepped) == STEPS
    for out, model_output in zip(outs[first:], stepped[1:], strict=True):
        channels = model_output.shape[1]
        assert torch.equal(model_output[: out.shape[0]], out[:, :channels])


@pytest.mark.parametrize("family", FAMILIES)
def test_sada_skipped_steps_make_no_transformer_call(family):
    pipe, kw = build_pipeline(family)
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, accel.SADAConfig(start=0.0, end=1.0, criterion="adams"))
    try:
        a = _run(pipe, kw)
        b = _run(pipe, kw)
        calls = accel.summary(pipe)["calls"]
    finally:
        batches.close()
        accel.remove(pipe)
    skipped = calls[-1]["skipped_steps"]
    per_step = 2 if family == "flux" else 1
    assert skipped, "SADA never skipped: the test says nothing"
    assert calls[-1]["transformer_calls"] == per_step * (STEPS - len(skipped))
    assert len(batches.sizes) == 2 * calls[-1]["transformer_calls"]  # two generations
    assert calls[0]["skipped_steps"] == skipped and torch.equal(a, b)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_linear_ag_estimates_uncond_on_the_cond_rows_only(family):
    pipe, kw = build_pipeline(family)
    cfg = accel.LinearAGConfig({2: [1.0, 0.0, 0.0], 3: [0.5, 0.5, 0.0]}, num_steps=STEPS)
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, cfg)
    try:
        _run(pipe, kw)
        call = accel.summary(pipe)["calls"][-1]
    finally:
        batches.close()
        accel.remove(pipe)
    estimated = call["estimated_uncond_steps"]
    assert estimated == sorted(accel.LinearAGConfig(cfg.coefficients, num_steps=STEPS).make().steps)
    assert estimated, "LinearAG estimated no step"
    if family == "flux":
        assert len(batches.sizes) == 2 * STEPS - len(estimated)
    else:
        assert batches.sizes == [1 if i in estimated else 2 for i in range(STEPS)]


@pytest.mark.parametrize(
    "make",
    [
        lambda comps: accel.FirstBlockCacheConfig(threshold=0.5, first_blocks=1, last_blocks=1),
        lambda comps: accel.TeaCacheConfig(threshold=0.5),
        lambda comps: accel.TaylorSeerConfig(interval=2, warmup_steps=2),
        lambda comps: accel.MagCacheConfig(mag_ratios=[1.0] * STEPS, retention_ratio=0.2),
    ],
    ids=["fnbn", "teacache", "taylorseer", "magcache"],
)
@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_online_caches_act_inside_the_pipeline(family, make):
    pipe, kw = build_pipeline(family)
    accel.apply(pipe, make(accel.layout(pipe.transformer)))
    try:
        a, b = _run(pipe, kw), _run(pipe, kw)
        ctxs = accel.summary(pipe)["calls"][-1]["contexts"]
    finally:
        accel.remove(pipe)
    assert torch.equal(a, b)
    assert sum(c["hits"] for c in ctxs.values()) > 0
    assert all(c["model_calls"] == STEPS for c in ctxs.values())


def test_combination_refused_before_the_first_step_and_pipeline_still_usable():
    pipe, kw = build_pipeline("sd3")
    cfg = accel.LinearAGConfig({2: [1.0, 0.0, 0.0]}, num_steps=STEPS, steps=(2,))
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, cfg, accel.SADAConfig(start=0.0, end=1.0))
    try:
        with pytest.raises(ValueError, match="cannot be combined"):
            _run(pipe, kw)
        assert batches.sizes == []  # refused before the transformer ran
    finally:
        batches.close()
        accel.remove(pipe)
    accel.apply(pipe, accel.LinearAGConfig({2: [1.0, 0.0, 0.0]}, num_steps=STEPS + 1))
    try:
        with pytest.raises(ValueError, match="fitted for 7 steps"):
            _run(pipe, kw)
    finally:
        accel.remove(pipe)
    assert torch.isfinite(_run(pipe, kw)).all()


def test_calibration_runs_through_a_pipeline(tmp_path):
    pipe, kw = build_pipeline("pixart")
    setup = accel.calibration_setup(pipe, kw, runs=2)
    mag = accel.run_calibration("magcache", setup, tmp_path / "mag.json")
    assert mag["calls"] == STEPS and len(mag["mag_ratios"]) == STEPS
    lin = accel.run_calibration("linear-ag", setup, tmp_path / "lin.json")
    assert lin["num_steps"] == STEPS and lin["coefficients"]
    accel.apply(
        pipe, accel.MagCacheConfig(str(tmp_path / "mag.json"), threshold=10.0, retention_ratio=0.2)
    )
    try:
        _run(pipe, kw)
        ctx = accel.summary(pipe)["calls"][-1]["contexts"]["default"]
        assert ctx["hits"] > 0
    finally:
        accel.remove(pipe)
    accel.apply(pipe, accel.LinearAGConfig(str(tmp_path / "lin.json")))
    try:
        _run(pipe, kw)
        assert accel.summary(pipe)["calls"][-1]["estimated_uncond_steps"]
    finally:
        accel.remove(pipe)


@pytest.mark.parametrize("method", ["bac", "ecad"])
def test_schedule_searches_run_through_a_pipeline(tmp_path, method):
    pipe, kw = build_pipeline("sd3")
    setup = accel.calibration_setup(
        pipe, kw, runs=1, options={"budget": "3", "pop": "4", "generations": "1"}
    )
    accel.run_calibration(method, setup, tmp_path / f"{method}.json")
    accel.apply(pipe, accel.ScheduleConfig(str(tmp_path / f"{method}.json")))
    try:
        _run(pipe, kw)
        ctx = accel.summary(pipe)["calls"][-1]["contexts"]["default"]
        assert ctx["model_calls"] == STEPS and ctx["hits"] > 0
    finally:
        accel.remove(pipe)


def test_flux_branches_map_to_adaptdiff_contexts():
    pipe, kw = build_pipeline("flux")
    accel.apply(pipe, accel.FirstBlockCacheConfig(threshold=0.0))
    try:
        _run(pipe, kw)
        assert set(accel.summary(pipe)["calls"][-1]["contexts"]) == {"cond", "uncond"}
        _run(pipe, kw, true_cfg_scale=1.0)  # no true CFG: cond calls only
        call = accel.summary(pipe)["calls"][-1]
        assert set(call["contexts"]) == {"cond"} and call["transformer_calls"] == STEPS
    finally:
        accel.remove(pipe)


def test_unknown_pipeline_raises_and_a_new_family_can_be_registered():
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4,
    )  # fmt: skip
    ddpm = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="DDPMPipeline is not a known pipeline family") as e:
        accel.apply(ddpm, accel.FirstBlockCacheConfig())
    assert "register_pipeline_family" in str(e.value)
    with pytest.raises(ValueError, match="nn.Module or a diffusers pipeline"):
        accel.apply(object(), accel.FirstBlockCacheConfig())

    pipe, kw = build_pipeline("dit")
    plain = _run(pipe, kw)

    class MyDiTPipeline(diffusers.DiTPipeline):
        pass

    pipe.__class__ = MyDiTPipeline
    fam = accel.PipelineFamily(
        "my-dit", ("MyDiTPipeline",), layout="cond_first", prediction="eps",
        guidance=lambda args: args["guidance_scale"] if args["guidance_scale"] > 1 else None,
        row_args=("hidden_states", "timestep", "class_labels"),
    )  # fmt: skip
    accel.register_pipeline_family(fam)
    try:
        handle = accel.apply(pipe, accel.AdaptiveGuidanceConfig(threshold=1.5))
        assert handle.family is fam
        assert torch.equal(_run(pipe, kw), plain)
        accel.remove(pipe)
        assert type(pipe) is MyDiTPipeline
    finally:
        from adaptdiff.accel.pipelines.families import FAMILIES as TABLE

        TABLE.pop("my-dit")
    with pytest.raises(ValueError, match="layout must be one of"):
        accel.PipelineFamily("x", ("X",), layout="rows", prediction="eps", guidance=lambda a: None)


RAS_FAMILIES = ["dit", "pixart", "sd3", "flux", "sana"]  # Sana: linear attention, Mix-FFN


def _images(pipe, kw, **extra):
    out = _run(pipe, kw, **extra).float()
    return out.unsqueeze(1) if out.ndim == 3 else out  # Flux's packed latents [B, N, C]


@pytest.mark.parametrize("family", RAS_FAMILIES)
def test_neutral_ras_is_the_plain_pipeline_exactly(family):
    pipe, kw = build_pipeline(family)
    plain = _run(pipe, kw)
    accel.apply(pipe, accel.RASConfig(sample_ratio=1.0, start_step=0))
    try:
        assert torch.equal(_run(pipe, kw), plain)
        for ctx in accel.summary(pipe)["calls"][-1]["contexts"].values():
            assert ctx["ras"]["ras_calls"] == 0 and ctx["ras"]["active_fraction"] == 1.0
    finally:
        accel.remove(pipe)
    assert torch.equal(_run(pipe, kw), plain)


@pytest.mark.parametrize("family", RAS_FAMILIES)
def test_ras_runs_half_the_image_tokens_inside_the_pipeline(family):
    steps = 10
    pipe, kw = build_pipeline(family, batch=2)
    kw["num_inference_steps"] = steps
    plain = _images(pipe, kw)
    t = pipe.transformer
    attn = (
        t.transformer_blocks[0].attn1
        if family in ("dit", "pixart", "sana")
        else t.transformer_blocks[0].attn
    )
    lengths = []  # the image sequence into the first block's attention, per transformer call
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]
        ),
        with_kwargs=True,
    )
    accel.apply(pipe, accel.RASConfig(sample_ratio=0.5, start_step=2, error_reset_steps=(6,)))
    try:
        out, again = _images(pipe, kw), _images(pipe, kw)
        call = accel.summary(pipe)["calls"][-1]
    finally:
        accel.remove(pipe)
        hook.remove()
    assert torch.equal(out, again)  # every call starts clean
    ras = next(iter(call["contexts"].values()))["ras"]
    assert [bool(k) for k in ras["skips"]] == [0, 0, 1, 1, 1, 1, 0, 1, 1, 1]
    assert ras["ras_calls"] == 7
    per_step = 2 if family == "flux" else 1  # Flux: a cond and an uncond call per step
    half = lengths[: len(lengths) // 2]  # the first of the two pipe(...) calls
    assert len(half) == steps * per_step
    dense = 64 if family == "sana" else 16  # tiny: 8x8 latent, patch 1 on Sana, 2 elsewhere
    assert ras["skips"] == [0 if k == 0 else dense // 2 for k in ras["skips"]]
    want = [dense if k == 0 else dense - k for k in ras["skips"] for _ in range(per_step)]
    assert half == want
    with driving(pipe, [ReusePrediction(i for i, skip in enumerate(ras["skips"]) if skip)]):
        baseline = _images(pipe, kw)
    rng = float(plain.max() - plain.min())
    ras_db = float(psnr(out, plain, rng).mean())
    reuse_db = float(psnr(baseline, plain, rng).mean())
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    # Recomputing half the tokens must beat keeping every token's prediction by a clear margin.
    assert ras_db > reuse_db + 3.0, (ras_db, reuse_db)


def test_sana_refuses_entropy_scaling_clearly():
    pipe, kw = build_pipeline("sana")
    plain = _run(pipe, kw)
    with pytest.raises(ValueError, match="linear attention"):
        accel.apply(pipe, accel.EntropyScalingConfig(train_tokens=64))
    assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(_run(pipe, kw), plain)  # the pipeline is untouched


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_entropy_scaling_inside_the_pipeline_at_another_size(family, monkeypatch):
    import torch.nn.functional as F

    from adaptdiff.accel.tokens.entropy_scaling import entropy_scale

    pipe, kw = build_pipeline(family)
    train, image, text = 16, 64, 6  # tiny: 4x4 image tokens; at twice the side 8x8; 6 text
    side = 2 * kw["height"]
    plain, plain_big = _run(pipe, kw), _run(pipe, kw, height=side, width=side)
    handle = accel.apply(pipe, accel.EntropyScalingConfig(train_tokens=train))
    try:
        assert torch.equal(_run(pipe, kw), plain)  # the training size: unchanged, bit for bit
        out = _run(pipe, kw, height=side, width=side)
        assert torch.equal(out, _run(pipe, kw, height=side, width=side))
        modules = handle.summary()["calls"][-1]["contexts"]
        assert all(c["entropy_scaling"]["train_tokens"] == train for c in modules.values())
    finally:
        accel.remove(pipe)
    assert torch.equal(_run(pipe, kw, height=side, width=side), plain_big)
    # The reference: the plain pipeline with SDPA's scale multiplied by lambda on the
    # self-attention (PixArt; its cross-attention over the text keeps its scale) or on the joint
    # attention over image + text keys (SD3, Flux: n = 64 + 6 keys, trained 16 + 6).
    joint = family != "pixart"
    keys = image + text if joint else image
    lam = entropy_scale(keys, train + text if joint else train)
    sdpa = F.scaled_dot_product_attention
    scaled_calls = []

    def scaled(*args, scale=None, **kwargs):  # diffusers passes query/key/value by name too
        q, k = (args[0], args[1]) if len(args) > 1 else (kwargs["query"], kwargs["key"])
        if k.shape[-2] == keys:  # [B, H, S, D]
            scale = (q.shape[-1] ** -0.5 if scale is None else scale) * lam
            scaled_calls.append(k.shape[-2])
        return sdpa(*args, scale=scale, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", scaled)
    ref = _run(pipe, kw, height=side, width=side)
    monkeypatch.undo()
    assert scaled_calls  # the reference did scale
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out - plain_big).abs().max() > 1e-2  # lambda acted, well above that tolerance


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_ras_with_entropy_scaling_is_refused(family):
    pipe, kw = build_pipeline(family)
    with pytest.raises(ValueError, match="cannot be combined with RASConfig"):
        accel.apply(pipe, accel.RASConfig(0.5), accel.EntropyScalingConfig(train_tokens=16))
    assert "forward" not in pipe.transformer.__dict__


@pytest.mark.parametrize("family", ["dit", "pixart", "sana"])
def test_ras_and_adaptive_guidance_compose_inside_the_pipeline(family):
    """Each method neutral leaves the other's output exactly; both active: AG's dropped rows and
    RAS's reduced tokens both reach the transformer, and every call starts clean."""
    pipe, kw = build_pipeline(family, batch=2)
    kw["num_inference_steps"] = 8
    ras, ag = accel.RASConfig(0.5, start_step=2), accel.AdaptiveGuidanceConfig(threshold=-1.0)
    alone = {}
    for name, config in (("ras", ras), ("ag", ag)):
        accel.apply(pipe, config)
        try:
            alone[name] = _images(pipe, kw)
        finally:
            accel.remove(pipe)
    neutral_ras = accel.RASConfig(sample_ratio=1.0, start_step=0)
    neutral_ag = accel.AdaptiveGuidanceConfig(threshold=1.5)
    for configs, want in (((ras, neutral_ag), "ras"), ((neutral_ras, ag), "ag")):
        accel.apply(pipe, *configs)
        try:
            assert torch.equal(_images(pipe, kw), alone[want]), want
        finally:
            accel.remove(pipe)
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, ras, ag)
    try:
        out, again = _images(pipe, kw), _images(pipe, kw)
        call = accel.summary(pipe)["calls"][-1]
    finally:
        batches.close()
        accel.remove(pipe)
    assert torch.equal(out, again)
    assert batches.sizes[:8] == [4] + [2] * 7  # AG: the uncond rows dropped after step 0
    assert call["uncond_rows_dropped"] == 2 * 7
    skips = next(iter(call["contexts"].values()))["ras"]["skips"]
    half = 32 if family == "sana" else 8  # half of the 64 (Sana) or 16 image tokens cached
    assert skips[:2] == [0, 0] and all(k == half for k in skips[2:])
    assert torch.isfinite(out).all()
    assert not torch.equal(out, alone["ras"]) and not torch.equal(out, alone["ag"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_ras_with_adaptive_guidance_is_refused_on_joint_attention(family):
    """RAS's joint-attention path caches per row of the model batch, which AG changes: refused
    before the transformer runs, and the pipeline stays usable."""
    pipe, kw = build_pipeline(family)
    batches = _Calls(pipe.transformer)
    accel.apply(pipe, accel.RASConfig(0.5), accel.AdaptiveGuidanceConfig(threshold=0.99))
    try:
        with pytest.raises(ValueError, match="cannot be combined with AdaptiveGuidance"):
            _run(pipe, kw)
        assert batches.sizes == []
    finally:
        batches.close()
        accel.remove(pipe)
    assert torch.isfinite(_run(pipe, kw)).all()


def test_sd3_skip_layer_guidance_is_refused():
    pipe, kw = build_pipeline("sd3")
    accel.apply(pipe, accel.FirstBlockCacheConfig(threshold=0.0))
    try:
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            _run(pipe, kw, skip_guidance_layers=[1])
    finally:
        accel.remove(pipe)


def test_transformer_called_outside_the_pipeline_still_works():
    pipe, kw = build_pipeline("dit")
    t = pipe.transformer
    x = torch.randn(2, 4, 8, 8)
    args = dict(timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        plain = t(x, **args).sample
        accel.apply(pipe, accel.FirstBlockCacheConfig(threshold=0.0))
        try:
            assert torch.equal(t(x, **args).sample, plain)
        finally:
            accel.remove(pipe)


class _DropRows(Accelerator):
    """Evaluates the uncond branch of sample rows ``rows`` only, from step ``at`` on, and adds
    ``delta`` to the guided prediction of step ``edit`` (an after_model edit, as RAS's merge)."""

    def __init__(self, rows, at, edit=None, delta=0.25):
        self.rows, self.at, self.edit, self.delta = torch.tensor(rows), at, edit, delta
        self.preds = {}

    def before_model(self, step):
        if step.index >= self.at and "uncond" in step.branches:
            step.uncond_rows = self.rows
        return None

    def after_model(self, step, pred):
        if step.index == self.edit:
            pred = pred + self.delta
        self.preds[step.index] = (pred, dict(step.branch_preds))
        return pred


def _stepping(pipe):
    """The model output the pipeline hands its scheduler at every step."""
    seen = []
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        seen.append(model_output)
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    return seen


@pytest.mark.parametrize("family", ["pixart", "dit", "flux"])
def test_per_row_uncond_and_after_model_edits_reach_the_scheduler(family):
    pipe, kw = build_pipeline(family, batch=2)
    calls = _Calls(pipe.transformer)
    seen = _stepping(pipe)
    acc = _DropRows([1], at=2, edit=3)
    try:
        with driving(pipe, [acc]):
            _run(pipe, kw)
    finally:
        calls.close()
        del pipe.scheduler.step
    if family == "flux":  # cond (2 rows) then uncond (2 rows, from step 2 on: row 1 only)
        assert calls.sizes == [2, 2] * 2 + [2, 1] * (STEPS - 2)
    else:
        assert calls.sizes == [4] * 2 + [3] * (STEPS - 2)  # row 0's uncond left out
    for i in range(STEPS):
        pred, branches = acc.preds[i]
        got = seen[i][:2, : pred.shape[1]]  # DiT steps both halves: the first is the samples
        if i >= 2:  # row 0 takes its cond prediction as uncond: guided = cond there
            assert torch.equal(branches["uncond"][0], branches["cond"][0])
        if family == "flux" and i == 3:  # the uncond output carries the edit: exact to rounding
            torch.testing.assert_close(got, pred.to(got.dtype), rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(got, pred.to(got.dtype)), i
