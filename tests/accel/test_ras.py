import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.tokens.ras import RAS, RASConfig, skip_schedule, theoretical_speedup
from adaptdiff.metrics import psnr
from adaptdiff.models import create_dit
from adaptdiff.samplers import Accelerator, sample
from tests.support.models import tiny_dit

from .support import ReusePrediction


def random_dit(seed=0, **overrides):
    """DiT-tiny/2 (8x8x4, 16 tokens) with every weight random: adaLN-Zero's zero init would
    make each block the identity and the output 0, hiding any error."""
    return tiny_dit(
        seed=seed, randomize=0.3, **{"learn_sigma": False, "time_scale": 1000.0, **overrides}
    )


def run(model, accelerators=(), method="euler", steps=8, guidance=2.0, batch=3, **kw):
    y = torch.arange(batch) % 10
    return sample(
        model,
        (batch, 4, 8, 8),
        method=method,
        steps=steps,
        prediction="flow",
        guidance_scale=guidance,
        cond={"y": y},
        uncond={"y": torch.full_like(y, 10)},
        accelerators=accelerators,
        generator=torch.Generator().manual_seed(1),
        progress=False,
        **kw,
    )


class Spy(Accelerator):
    def __init__(self):
        self.preds = []

    def after_model(self, step, pred):
        self.preds.append(pred.clone())
        return pred


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_ratio_one_is_bit_identical_to_plain_sampling(method):
    model = random_dit()
    plain = run(model, method=method)
    ras = RAS(model, sample_ratio=1.0, start_step=0)
    assert torch.equal(run(model, [ras], method=method), plain)
    assert ras.summary()["ras_calls"] == 0


def test_dense_steps_that_fill_the_caches_are_bit_identical():
    # Steps 0-5 plain, step 6 dense through RAS's K/V-keeping attention, step 7 a RAS step.
    model = random_dit()
    plain, ras_spy = Spy(), Spy()
    run(model, [plain])
    ras = RAS(model, sample_ratio=0.5, start_step=7)
    run(model, [ras, ras_spy])
    assert ras.summary()["ras_calls"] == 1
    for a, b in zip(plain.preds[:7], ras_spy.preds[:7], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain.preds[7], ras_spy.preds[7])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_only_dense_steps_before_a_ras_step_keep_kv(method):
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=3, error_reset_steps=(5, 6), end_step=7)
    run(model, [ras], method=method, steps=10)
    assert ras.summary()["skips"] == [0, 0, 0, 8, 8, 0, 0, 8, 0, 0]
    per_step = {r["index"]: (r["kv_fill"], r["ras"]) for r in ras.records}  # Heun: both calls
    fills = [s for s, (fill, _) in per_step.items() if fill]
    assert fills == [2, 6]  # before steps 3 and 7; steps 0, 1, 5, 8, 9 run the plain model
    assert [s for s, (_, r) in per_step.items() if r] == [3, 4, 7]


class SuppliesStep(Accelerator):
    """Supplies the prediction of one step (as a step cache would) from the previous one."""

    def __init__(self, index):
        self.index, self.last = index, None

    def before_model(self, step):
        return self.last if step.index == self.index else None

    def after_model(self, step, pred):
        self.last = pred
        return pred


def test_a_ras_step_after_a_supplied_step_runs_dense_and_fills_the_caches():
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=3)
    out = run(model, [SuppliesStep(2), ras], steps=6)  # step 2 would have filled the caches
    assert torch.isfinite(out).all()
    fills = [r["index"] for r in ras.records if r["kv_fill"]]
    assert fills == [3] and [r["index"] for r in ras.records if r["ras"]] == [4, 5]


def test_the_guidance_batch_index_is_repeated_once_per_step():
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=2)
    calls = []
    repeat = torch.Tensor.repeat

    def counting_repeat(self, *sizes):
        calls.append(sizes)
        return repeat(self, *sizes)

    torch.Tensor.repeat = counting_repeat
    try:
        run(model, [ras], steps=4, batch=2)  # guidance: model batch 4, two RAS steps
    finally:
        torch.Tensor.repeat = repeat
    assert calls.count((2, 1)) == 2
    state = ras.state
    state.active = torch.tensor([[0, 3], [1, 2]])
    index = state.index_for(4)
    assert state.index_for(4) is index
    assert torch.equal(index, torch.tensor([[0, 3], [1, 2], [0, 3], [1, 2]]))
    assert torch.equal(state.index_for(2), state.active)
    with pytest.raises(RuntimeError, match="multiple"):
        state.index_for(3)


class AllTokensPermuted(RAS):
    """RAS steps whose active set is every token, in a random order: exercises gather, the K/V
    cache refill, attention against the cache, scatter and the merge, with nothing stale."""

    def _select(self, skip):
        B, n = self.drop_count.shape
        return torch.stack(
            [torch.randperm(n, generator=torch.Generator().manual_seed(b)) for b in range(B)]
        )


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ras_steps_with_all_tokens_active_match_dense(method):
    model = random_dit()
    plain = run(model, method=method)
    ras = AllTokensPermuted(model, sample_ratio=0.5, start_step=2)
    out = run(model, [ras], method=method)
    assert ras.summary()["ras_calls"] > 0
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_cached_patches_keep_the_last_velocity_and_active_ones_are_recomputed():
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    spy = Spy()
    out = run(model, [ras, spy], steps=8)
    assert torch.isfinite(out).all()
    assert ras.summary()["skips"] == [0, 0, 8, 8, 8, 0, 8, 8]
    B, p = 3, 2
    for s in (2, 3, 4, 6, 7):
        prev, cur = spy.preds[s - 1], spy.preds[s]
        same = (cur == prev).view(B, 4, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).flatten(3).all(3)
        # 8 of the 16 patches per sample are cached (exactly equal), the others recomputed.
        assert (same.flatten(1).sum(1) >= 8).all()
        assert (same.flatten(1).sum(1) < 16).all()
    assert ras.summary()["active_fraction"] == pytest.approx((3 + 5 * 0.5) / 8)


def test_ras_stays_close_to_dense_and_is_deterministic():
    model = random_dit()
    plain = run(model, steps=12)
    ras = RAS(model, sample_ratio=0.75, start_step=3, error_reset_steps=(7,))
    a = run(model, [ras], steps=12)
    b = run(model, [ras], steps=12)  # state is reset between calls
    assert torch.equal(a, b)
    skips = ras.summary()["skips"]
    assert sum(s > 0 for s in skips) == 8
    # the baseline on the same steps: every token keeps its last velocity
    reuse = run(model, [ReusePrediction([i for i, s in enumerate(skips) if s])], steps=12)
    ras_db, reuse_db = psnr(a, plain).mean(), psnr(reuse, plain).mean()
    assert not torch.equal(a, plain)
    # recomputing a quarter of the tokens (the others cached) beats keeping every velocity
    assert ras_db > reuse_db + 3.0, (ras_db, reuse_db)


def test_metrics_select_differently_and_random_is_seeded():
    model = random_dit()
    outs = {m: run(model, [RAS(model, metric=m, start_step=2)]) for m in ("std", "l2", "random")}
    assert not torch.equal(outs["std"], outs["random"])
    again = run(model, [RAS(model, metric="random", start_step=2)])
    assert torch.equal(outs["random"], again)
    other_seed = run(model, [RAS(model, metric="random", start_step=2, seed=5)])
    assert not torch.equal(outs["random"], other_seed)


def _selector(starvation, high_ratio=1.0):
    model = random_dit()
    ras = RAS(
        model, metric="std", starvation=starvation, starvation_scale=1.0, high_ratio=high_ratio
    )
    # One sample, 4 patches of 2x2 on a 4x4 image; patch i has channel std i + 1.
    pred = torch.zeros(1, 4, 4, 4)
    for i, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        pred[0, :, r : r + 2, c : c + 2] = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(4, 1, 1) * (
            i + 1
        )
    ras.last_pred, ras.drop_count = pred, torch.zeros(1, 4)
    return ras


def test_selection_caches_the_highest_scores_and_high_ratio_takes_some_lowest():
    ras = _selector("corrected")
    active = ras._select(2)
    assert active.tolist() == [[0, 1]]  # patches 2, 3 (highest std) cached
    ras._mark(active)
    assert ras.drop_count.tolist() == [[0, 0, 1, 1]]
    assert ras.active_mask.tolist() == [[True, True, False, False]]
    ras = _selector("corrected", high_ratio=0.5)
    assert ras._select(2).tolist() == [[1, 2]]  # one lowest (0), one highest (3) cached


def test_starvation_corrected_recomputes_often_cached_patches_reference_does_not():
    for mode, expected in (("corrected", [[2, 3]]), ("reference", [[0, 1]])):
        ras = _selector(mode)
        ras.drop_count = torch.tensor([[0.0, 0.0, 3.0, 3.0]])  # patches 2, 3 cached 3 times
        assert ras._select(2).tolist() == expected, mode


def test_skip_schedule_static_dynamic_and_dense_steps():
    cfg = RASConfig(sample_ratio=0.5, start_step=2, error_reset_steps=(4,), end_step=6)
    assert skip_schedule(cfg, 8, 100) == [0, 0, 50, 50, 0, 50, 50, 0]
    ramp = RASConfig(sample_ratio=0.5, start_step=4, skip_num_step=16, skip_num_step_length=4,
                     skip_multiple=8)  # fmt: skip
    skips = skip_schedule(ramp, 30, 256)
    assert skips[:4] == [0] * 4
    assert all(k % 8 == 0 for k in skips)
    assert skips[4] < skips[12] < skips[29]
    assert abs(sum(skips[4:]) / 26 - 128) <= 16
    assert theoretical_speedup(
        skip_schedule(RASConfig(error_reset_steps=(12, 20)), 28, 256), 256
    ) == pytest.approx(28 / (6 + 22 * 0.5))


def test_remove_restores_the_model_and_bad_input_raises():
    model = random_dit()
    plain = run(model)
    ras = RAS(model, sample_ratio=0.5, start_step=1)
    assert not torch.equal(run(model, [ras]), plain)
    ras.remove()
    ras.remove()
    assert "forward" not in model.blocks[0].attn.__dict__
    assert torch.equal(run(model), plain)
    with pytest.raises(RuntimeError, match="remove"):
        run(model, [ras])
    with pytest.raises(ValueError, match="sample_ratio"):
        RASConfig(sample_ratio=0.0)
    with pytest.raises(ValueError, match="metric"):
        RASConfig(metric="entropy")
    with pytest.raises(ValueError, match="starvation"):
        RASConfig(starvation="inverse")
    with pytest.raises(ValueError, match="adaptdiff DiT"):
        RAS(torch.nn.Linear(2, 2))


def test_ras_on_a_learned_sigma_dit_and_another_model_raises():
    model = random_dit(learn_sigma=True)
    ras = RAS(model, start_step=1)
    assert torch.isfinite(run(model, [ras])).all()
    with pytest.raises(RuntimeError, match="was not called"):
        run(random_dit(seed=1), [ras])


class DiffusersAdapter(torch.nn.Module):
    """A diffusers transformer as ``model(x, t, y)``: DiT takes class labels, PixArt a fixed
    random caption (the label picks nothing: a smoke model)."""

    def __init__(self, transformer, kind):
        super().__init__()
        self.transformer, self.kind = transformer, kind

    def forward(self, x, t, y=None):
        t = t * 1000
        if self.kind == "dit":
            return self.transformer(x, timestep=t, class_labels=y).sample
        text = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0)).expand(
            len(x), -1, -1
        )
        no_sizes = {"resolution": None, "aspect_ratio": None}
        out = self.transformer(
            x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=no_sizes
        ).sample
        return out[:, :4]


def diffusers_model(kind):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    common = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                  sample_size=8, patch_size=2)  # fmt: skip
    if kind == "dit":
        model = diffusers.DiTTransformer2DModel(out_channels=4, num_embeds_ada_norm=10, **common)
    else:
        model = diffusers.PixArtTransformer2DModel(
            out_channels=8, cross_attention_dim=16, caption_channels=16,
            use_additional_conditions=False, **common,
        )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_ras_on_diffusers_transformers(kind):
    transformer = diffusers_model(kind)
    model = DiffusersAdapter(transformer, kind)
    plain = run(model)
    ras = RAS(transformer, sample_ratio=1.0)
    assert torch.equal(run(model, [ras]), plain)
    ras.remove()
    full = AllTokensPermuted(transformer, sample_ratio=0.5, start_step=2)
    torch.testing.assert_close(run(model, [full]), plain, rtol=1e-4, atol=1e-4)
    full.remove()
    ras = RAS(transformer, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    out = run(model, [ras])
    assert ras.summary()["ras_calls"] == 5
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    ras.remove()
    assert torch.equal(run(model), plain)


def test_ras_through_the_accel_hook_api_matches_the_standalone_accelerator():
    model = random_dit()
    plain = run(model)
    config = RASConfig(sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    ras = RAS(model, config)
    expected = run(model, [ras])
    ras.remove()
    handle = accel.apply(model, config)
    assert torch.equal(run(model, [handle]), expected)
    assert accel.summary(model)["default"]["ras"]["ras_calls"] == 5
    accel.remove(model)
    assert torch.equal(run(model), plain)


def test_demo_rows_make_ras_per_run_and_take_it_off_after():
    from adaptdiff.demo import DEFAULT_SETTINGS
    from adaptdiff.recipes.digits import SamplingSetting, generate

    ras_rows = [s for s in DEFAULT_SETTINGS if s.name().startswith("RAS")]
    assert ras_rows and all(callable(a) for s in ras_rows for a in s.accelerators)
    model = create_dit("DiT-demo/4", in_channels=1, input_size=16, learn_sigma=False,
                       time_scale=1000.0).eval()  # fmt: skip
    setting = SamplingSetting("euler", 6, accelerators=ras_rows[0].accelerators)
    x, info = generate(model, setting, torch.arange(4) % 10)
    assert x.shape == (4, 1, 16, 16) and info["nfe"] == 6
    assert all("forward" not in b.attn.__dict__ for b in model.blocks)


@pytest.mark.parametrize("channels, metric, warns", [(1, "std", True), (1, "l2", False),
                                                     (4, "std", False)])  # fmt: skip
def test_std_metric_on_one_channel_samples_warns(channels, metric, warns):
    """'std' is the spread across channels: on one-channel samples every score is 0 and the
    selection falls to the starvation counts, which the user is told."""
    import warnings

    model = random_dit(in_channels=channels)
    ras = RAS(model, sample_ratio=0.5, start_step=2, metric=metric)
    y = torch.arange(2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sample(model, (2, channels, 8, 8), method="euler", steps=4, prediction="flow",
               cond={"y": y}, accelerators=[ras], progress=False)  # fmt: skip
    ras.remove()
    hits = [w for w in seen if "one-channel" in str(w.message)]
    assert len(hits) == (1 if warns else 0), [str(w.message) for w in seen]
