import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.caching.schedule import Schedule, ScheduleConfig
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


def test_search_improves_on_a_synthetic_problem_and_respects_the_budget():
    target = [99.0, 60.0, 30.0, 12.0, 3.0]
    depth, k, max_skip = 4, 5, 0.25
    seen = []

    def fitness(g: Genome) -> float:
        seen.append(g)
        assert list(g.timesteps) == sorted(g.timesteps, reverse=True)
        assert len(set(g.timesteps)) == k and not g.skips[0]
        dist = sum(abs(a - b) for a, b in zip(g.timesteps, target, strict=False))
        return dist + 5 * (g.executed(depth) / (k * depth))  # skipping blocks is rewarded

    result = evolve(
        fitness, range(100), k, depth=depth, max_skip=max_skip, generations=14, stage1=4,
        population=24, seed=1,
    )  # fmt: skip
    assert result.history[-1] < result.history[0]
    assert all(b <= a for a, b in zip(result.history, result.history[1:], strict=False))  # elitist
    assert all(g.executed(depth) >= (1 - max_skip) * k * depth for g in seen)
    assert not any(any(g.skips) for g in seen[:24])  # stage 1 searches timesteps only
    assert any(result.best.skips)


def test_evolve_checks_arguments():
    with pytest.raises(ValueError, match="k must be"):
        evolve(lambda g: 0.0, range(3), 5)
    with pytest.raises(ValueError, match="depth"):
        evolve(lambda g: 0.0, range(30), 3, max_skip=0.2)


def _tiny_dit():
    return tiny_dit(perturb=0.05, learn_sigma=False)


def test_genome_skips_run_through_the_schedule_executor():
    # the blocks carry a large share of the output: what a skipped block returns shows
    model = real_dit(depth=2, learn_sigma=False)  # flow matching, t in [0, 1]
    assert block_share(model, t=0.5) > 0.3
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = {"y": torch.tensor([1, 2])}
    ts = (1.0, 0.7, 0.4, 0.1)
    kw = dict(method="euler", timesteps=list(ts), prediction="flow", progress=False, cond=y)
    ref = sample(model, x, **kw)
    assert apply_genome(model, Genome(ts, (frozenset(),) * 4)) is None
    g = Genome(ts, (frozenset(), {0}, {1}, {0}))
    handle = apply_genome(model, g)
    skip = sample(model, x, accelerators=[handle], **kw)
    rates = accel.summary(model)["default"]["block_hit_rates"]
    accel.remove(model)
    assert rates == [0.5, 0.25]  # block 0 reused at steps 1 and 3, block 1 at step 2
    # the zero-update baseline: the skipped blocks as the identity on the same calls
    with identity_blocks(model, [0], [1, 3]), identity_blocks(model, [1], [2]):
        dropped = sample(model, x, **kw)
    err, err_drop = rel_err(skip, ref), rel_err(dropped, ref)
    assert 0 < err < err_drop / 3, (err, err_drop)  # measured 0.031 against 0.112
    assert torch.equal(sample(model, x, **kw), ref)  # removed: plain again
    with pytest.raises(ValueError, match="step 0"):
        apply_genome(model, Genome((999.0, 100.0), ({0}, frozenset())))


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
    save_schedule(tmp_path / "s.json", g, depth=2)
    assert Schedule.load(tmp_path / "s.json").num_steps == 3  # the hooks' executor reads it
    assert load_schedule(tmp_path / "s.json") == g


def test_saved_schedule_samples_exactly_what_the_search_scored(tmp_path):
    model = _tiny_dit()
    metric = lambda x: float(x.double().square().mean())  # noqa: E731
    kw = dict(method="ddim", num_samples=4, prediction="eps", schedule=VPSchedule(), seed=3)
    g = Genome((999.0, 600.0, 300.0, 50.0), (frozenset(), {0}, {0, 1}, {1}))
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
