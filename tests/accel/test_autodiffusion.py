import copy

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.caching.schedule import Schedule, ScheduleConfig
from adaptdiff.accel.hooks import layout
from adaptdiff.accel.steps.autodiffusion import (
    Genome,
    apply_genome,
    evolve,
    load_schedule,
    sample_fitness,
    save_schedule,
    schedule_json,
    uniform_genome,
)
from adaptdiff.samplers import VPSchedule, sample
from tests.support.models import tiny_dit

from .support import block_share, identity_blocks, real_dit, rel_err


def test_uniform_genome_is_evenly_spaced_from_the_noise_end():
    g = uniform_genome(range(100), 4)
    assert g.timesteps == (99.0, 74.0, 49.0, 24.0) and g.skips == (frozenset(),) * 4
    flow = uniform_genome([i / 1000 for i in range(1, 1001)], 4).timesteps
    assert flow == pytest.approx((1.0, 0.75, 0.5, 0.25))


@pytest.mark.parametrize("semantics", ["remove", "reuse"])
def test_search_improves_on_a_synthetic_problem_and_respects_the_budget(semantics):
    target = [99.0, 60.0, 30.0, 12.0, 3.0]
    depth, k, max_skip = 4, 5, 0.25
    seen = []

    def fitness(g: Genome) -> float:
        seen.append(g)
        assert g.semantics == semantics
        assert list(g.timesteps) == sorted(g.timesteps, reverse=True)
        assert len(set(g.timesteps)) == k
        # the step-0 skips count (and are rewarded) too: removal may drop them, reuse may not
        dist = sum(abs(a - b) for a, b in zip(g.timesteps, target, strict=False))
        return dist + 5 * (g.executed(depth) / (k * depth)) + 0.5 * len(g.skips[0])

    result = evolve(
        fitness, range(100), k, depth=depth, max_skip=max_skip, generations=14, stage1=4,
        population=24, seed=1, semantics=semantics,
    )  # fmt: skip
    assert result.history[-1] < result.history[0]
    assert all(b <= a for a, b in zip(result.history, result.history[1:], strict=False))  # elitist
    assert all(g.executed(depth) >= (1 - max_skip) * k * depth for g in seen)
    assert not any(any(g.skips) for g in seen[:24])  # stage 1 searches timesteps only
    assert any(result.best.skips) and result.best.semantics == semantics
    step0 = any(g.skips[0] for g in seen)
    assert step0 if semantics == "remove" else not step0  # reuse has nothing cached at step 0


def test_evolve_checks_arguments():
    with pytest.raises(ValueError, match="k must be"):
        evolve(lambda g: 0.0, range(3), 5)
    with pytest.raises(ValueError, match="depth"):
        evolve(lambda g: 0.0, range(30), 3, max_skip=0.2)
    with pytest.raises(ValueError, match=r"evolve: semantics must be one of \['remove', 'reuse'\]"):
        evolve(lambda g: 0.0, range(30), 3, semantics="drop")
    with pytest.raises(ValueError, match="Genome: semantics must be one of"):
        Genome((1.0, 0.5), (frozenset(), frozenset()), "skip")
    with pytest.raises(ValueError, match="2 timesteps but 1 skip sets"):
        Genome((1.0, 0.5), (frozenset(),))
    with pytest.raises(ValueError, match="Schedule: skipped must be one of"):
        Schedule.full([["attn", "mlp"]], 2, skipped="zero")
    doc = schedule_json(Genome((1.0, 0.5), (frozenset(), {0})), depth=1)
    with pytest.raises(ValueError, match="skipped must be one of"):
        Schedule.load({**doc, "skipped": "drop"})


def _tiny_dit():
    return tiny_dit(perturb=0.05, learn_sigma=False)


def _flow_setup():
    model = real_dit(depth=2, learn_sigma=False)  # flow matching, t in [0, 1]
    # the blocks carry a large share of the output: what a skipped block returns shows
    assert block_share(model, t=0.5) > 0.3
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = (1.0, 0.7, 0.4, 0.1)
    kw = dict(method="euler", timesteps=list(ts), prediction="flow", progress=False,
              cond={"y": torch.tensor([1, 2])})  # fmt: skip
    return model, x, ts, kw


def _run_genome(model, x, g, kw):
    handle = apply_genome(model, g)
    try:
        out = sample(model, x, accelerators=[handle], **kw)
        summary = accel.summary(model)["default"]
        assert summary["schedule_skipped"] == g.semantics
        rates = summary["block_hit_rates"]
    finally:
        accel.remove(model)
    return out, rates


def test_reuse_genome_skips_run_through_the_schedule_executor():
    model, x, ts, kw = _flow_setup()
    ref = sample(model, x, **kw)
    assert apply_genome(model, Genome(ts, (frozenset(),) * 4, "reuse")) is None
    skip, rates = _run_genome(model, x, Genome(ts, (frozenset(), {0}, {1}, {0}), "reuse"), kw)
    assert rates == [0.5, 0.25]  # block 0 reused at steps 1 and 3, block 1 at step 2
    # the zero-update baseline: the skipped blocks as the identity on the same calls
    with identity_blocks(model, [0], [1, 3]), identity_blocks(model, [1], [2]):
        dropped = sample(model, x, **kw)
    err, err_drop = rel_err(skip, ref), rel_err(dropped, ref)
    assert 0 < err < err_drop / 3, (err, err_drop)  # measured 0.031 against 0.112
    assert torch.equal(sample(model, x, **kw), ref)  # removed: plain again
    with pytest.raises(ValueError, match="step 0"):
        apply_genome(model, Genome((999.0, 100.0), ({0}, frozenset()), "reuse"))


def test_removed_blocks_return_their_input_and_differ_from_reuse():
    model, x, ts, kw = _flow_setup()
    ref = sample(model, x, **kw)
    skips = (frozenset({1}), {0}, {1}, {0})  # removal may drop blocks at step 0 too
    removed, rates = _run_genome(model, x, Genome(ts, skips), kw)
    assert rates == [0.5, 0.5]
    # the paper's removal: the blocks are the identity on exactly these calls
    with identity_blocks(model, [0], [1, 3]), identity_blocks(model, [1], [0, 2]):
        dropped = sample(model, x, **kw)
    assert torch.equal(removed, dropped)
    assert rel_err(removed, ref) > 0.05  # the removed blocks matter
    # adaptdiff's reuse variant computes something else on the same skips (step 0 computes)
    skips = (frozenset(), {0}, {1}, {0})
    removed, _ = _run_genome(model, x, Genome(ts, skips, "remove"), kw)
    reused, _ = _run_genome(model, x, Genome(ts, skips, "reuse"), kw)
    assert rel_err(removed, reused) > 0.01, rel_err(removed, reused)
    assert torch.equal(sample(model, x, **kw), ref)  # taken off: plain again


@torch.no_grad()
def test_a_removed_block_equals_the_model_without_it():
    model = real_dit(depth=3, learn_sigma=False)
    assert block_share(model, t=0.5) > 0.3
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.full((2,), 0.5), torch.tensor([3, 7])
    handle = apply_genome(model, Genome((0.5,), (frozenset({1}),)))
    assert handle is not None
    removed = model(x, t, y=y)
    accel.remove(model)
    pruned = copy.deepcopy(model)
    del pruned.blocks[1]  # the reference's dynamic model: the block is not there
    assert len(pruned.blocks) == 2
    assert torch.equal(removed, pruned(x, t, y=y))
    assert rel_err(removed, model(x, t, y=y)) > 0.05  # and block 1 does matter


@torch.no_grad()
def test_a_removed_component_equals_the_block_without_it():
    model = real_dit(depth=2, learn_sigma=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.full((2,), 0.5), torch.tensor([3, 7])
    full = model(x, t, y=y)
    for name in ("attn", "mlp"):
        mask = [[[True, True], [c != name for c in ("attn", "mlp")]]]  # block 1's `name`
        sched = Schedule(layout(model), mask, skipped="remove")
        accel.apply(model, ScheduleConfig(sched))
        removed = model(x, t, y=y)
        accel.remove(model)
        # the model with that component deleted: block 1 without the branch
        pruned = copy.deepcopy(model)
        blk = pruned.blocks[1]
        keep = blk.mlp_branch if name == "attn" else blk.attn_branch
        blk.forward = lambda h, c, mask=None, keep=keep: h + keep(h, c)
        assert torch.equal(removed, pruned(x, t, y=y)), name
        assert rel_err(removed, full) > 0.01, name


def test_sample_fitness_and_schedule_json(tmp_path):
    model = _tiny_dit()
    fit = sample_fitness(
        model, lambda x: float(x.abs().mean()), method="ddim", num_samples=4,
        prediction="eps", schedule=VPSchedule(),
    )  # fmt: skip
    g = Genome((999.0, 500.0, 100.0), (frozenset(), frozenset({1}), frozenset()))
    assert fit(g) == fit(g) and fit(g) != fit(uniform_genome(range(1000), 3))
    data = schedule_json(g, depth=2)
    assert data["format"] == "adaptdiff.schedule" and data["mask"][1] == ["11", "00"]
    assert data["mask"][0] == ["11", "11"] and data["meta"]["method"] == "autodiffusion"
    assert data["skipped"] == "remove"  # the paper's semantics by default
    save_schedule(tmp_path / "s.json", g, depth=2)
    assert Schedule.load(tmp_path / "s.json").num_steps == 3  # the hooks' executor reads it
    assert load_schedule(tmp_path / "s.json") == g
    reuse = Genome(g.timesteps, g.skips, "reuse")
    assert fit(reuse) != fit(g)  # the semantics change the samples
    assert "skipped" not in schedule_json(reuse, depth=2)  # as files from before the option
    save_schedule(tmp_path / "r.json", reuse, depth=2)
    assert load_schedule(tmp_path / "r.json") == reuse


@pytest.mark.parametrize("semantics", ["remove", "reuse"])
def test_the_search_runs_on_a_model_with_both_semantics(semantics):
    model = _tiny_dit()
    fit = sample_fitness(
        model, lambda x: float(x.double().square().mean()), method="ddim", num_samples=2,
        prediction="eps", schedule=VPSchedule(),
    )  # fmt: skip
    found = evolve(
        fit, range(0, 1000, 50), 3, depth=len(model.blocks), max_skip=0.5, generations=4,
        stage1=1, population=6, parents=3, mutations=3, crossovers=1, seed=0,
        semantics=semantics,
    )  # fmt: skip
    assert found.best.semantics == semantics and found.evaluations > 6
    assert found.best_fitness == min(found.history) == fit(found.best)


def test_saved_schedule_samples_exactly_what_the_search_scored(tmp_path):
    model = _tiny_dit()
    metric = lambda x: float(x.double().square().mean())  # noqa: E731
    kw = dict(method="ddim", num_samples=4, prediction="eps", schedule=VPSchedule(), seed=3)
    g = Genome((999.0, 600.0, 300.0, 50.0), ({1}, {0}, {0, 1}, {1}))  # removal
    searched = sample_fitness(model, metric, **kw)(g)
    save_schedule(tmp_path / "s.json", g, depth=len(model.blocks))
    # Replay from the file alone: timesteps from meta, skips through the executor.
    replay = load_schedule(tmp_path / "s.json")
    labels = torch.arange(4) % 10
    handle = accel.apply(model, ScheduleConfig(str(tmp_path / "s.json")))
    x = sample(
        model, (4, 4, 8, 8), method="ddim", timesteps=list(replay.timesteps), guidance_scale=1.5,
        cond={"y": labels}, uncond={"y": torch.full_like(labels, model.null_label)},
        prediction="eps", schedule=VPSchedule(), accelerators=[handle], progress=False,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    accel.remove(model)
    assert metric(x) == searched


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@torch.no_grad()
def test_removal_on_diffusers_blocks_equals_deleting_the_block(kind):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    common = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                  sample_size=8, patch_size=2, norm_num_groups=1)  # fmt: skip
    x = torch.randn(2, 4, 8, 8)
    if kind == "dit":
        model = diffusers.DiTTransformer2DModel(num_embeds_ada_norm=10, **common)
        kw = dict(timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
    else:
        model = diffusers.PixArtTransformer2DModel(
            out_channels=8, cross_attention_dim=16, caption_channels=16, **common
        )
        kw = dict(
            encoder_hidden_states=torch.randn(2, 5, 16), timestep=torch.tensor([500.0, 500.0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )  # fmt: skip
    model.eval()  # (training mode drops class labels at random)
    comps = layout(model)
    mask = [[[b != 1] * len(c) for b, c in enumerate(comps)]]  # block 1, every component
    accel.apply(model, ScheduleConfig(Schedule(comps, mask, skipped="remove")))
    removed = model(x, **kw).sample
    accel.remove(model)
    pruned = copy.deepcopy(model)
    del pruned.transformer_blocks[1]
    assert torch.equal(removed, pruned(x, **kw).sample)
    assert rel_err(removed, model(x, **kw).sample) > 0.01  # block 1 does matter
