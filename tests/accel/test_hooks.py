"""The hook infrastructure: apply/remove, contexts, resets, counters, torch.compile."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import FirstBlockCacheConfig, Schedule, ScheduleConfig
from adaptdiff.accel.caching.producers import interval_schedule
from adaptdiff.samplers import sample

from .support import run, tiny_dit


def test_discovery_on_dit():
    model = tiny_dit()
    assert [n for n, _ in accel.find_blocks(model)] == [f"blocks.{i}" for i in range(4)]
    assert accel.layout(model) == [["attn", "mlp"]] * 4
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        accel.find_blocks(model, ["nope"])
    with pytest.raises(ValueError, match="found no transformer blocks"):
        accel.apply(torch.nn.Linear(2, 2), FirstBlockCacheConfig())


def test_all_compute_schedule_is_bit_identical():
    model = tiny_dit()
    plain = run(model)
    handle = accel.apply(model, ScheduleConfig(Schedule.for_model(model, 8)))
    assert torch.equal(run(model, [handle]), plain)
    s = accel.summary(model)["default"]
    assert s["hits"] == 0 and s["misses"] == 8 * 4 * 2 and s["model_calls"] == 8


def test_remove_and_reapply():
    model = tiny_dit()
    plain = run(model)
    cfg = FirstBlockCacheConfig(threshold=10.0)
    handle = accel.apply(model, cfg)
    cached = run(model, [handle])
    assert not torch.equal(cached, plain)  # it skipped something
    with pytest.raises(ValueError, match="already has adaptdiff.accel hooks"):
        accel.apply(model, cfg)
    accel.remove(model)
    assert "forward" not in model.blocks[1].__dict__
    assert torch.equal(run(model), plain)
    accel.remove(model)  # removing twice is harmless
    handle = accel.apply(model, cfg)
    assert torch.equal(run(model, [handle]), cached)
    accel.remove(model)
    assert torch.equal(run(model), plain)


def test_state_resets_at_every_sample_call():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig(threshold=0.5))
    first = run(model, [handle])
    s1 = accel.summary(model)
    second = run(model, [handle])
    assert torch.equal(first, second)
    assert accel.summary(model) == s1
    assert s1["default"]["cached_steps"], "the threshold should have skipped some steps"


def test_without_the_handle_state_carries_over_until_reset():
    model = tiny_dit()
    plain = run(model)
    accel.apply(model, ScheduleConfig(interval_schedule(accel.layout(model), 8, 2)))
    first = run(model)
    assert not torch.equal(first, plain)
    # the step counter went on: calls 8..15 lie past the schedule and compute
    assert torch.equal(run(model), plain)
    accel.reset(model)
    assert torch.equal(run(model), first)


def _three_calls(model, xs, t, y, name=None):
    outs = []
    for x, tt in zip(xs, t, strict=True):
        if name is None:
            outs.append(model(x, tt, y))
        else:
            with accel.context(model, name):
                outs.append(model(x, tt, y))
    return outs


def test_contexts_keep_separate_state():
    model = tiny_dit()
    steps = 3
    comps = accel.layout(model)
    sched = Schedule.full(comps, steps)
    sched.mask[1] = [[False, False] for _ in comps]  # call 1 reuses everything
    sched.mask[2] = [[False, True] for _ in comps]
    y = torch.tensor([3])
    t = [torch.tensor([900.0]), torch.tensor([500.0]), torch.tensor([100.0])]
    xc = [torch.randn(1, 4, 8, 8) for _ in range(steps)]
    xu = [torch.randn(1, 4, 8, 8) for _ in range(steps)]
    handle = accel.apply(model, ScheduleConfig(sched))
    alone = _three_calls(model, xc, t, y)
    handle.reset()
    interleaved_c, interleaved_u = [], []
    for i in range(steps):
        interleaved_c += _three_calls(model, xc[i : i + 1], t[i : i + 1], y, "cond")
        interleaved_u += _three_calls(model, xu[i : i + 1], t[i : i + 1], y, "uncond")
    for a, b in zip(alone, interleaved_c, strict=True):
        assert torch.equal(a, b)
    s = accel.summary(model)
    assert set(s) == {"cond", "uncond"}
    assert s["cond"]["model_calls"] == s["uncond"]["model_calls"] == 3
    assert s["cond"]["hits"] == s["uncond"]["hits"] == 4 * 2 + 4
    with pytest.raises(ValueError, match="context name"):
        with accel.context(model, ""):
            pass


def test_batch_change_recomputes_instead_of_reusing():
    model = tiny_dit()
    comps = accel.layout(model)
    sched = Schedule.full(comps, 2)
    sched.mask[1] = [[False, False] for _ in comps]
    accel.apply(model, ScheduleConfig(sched), FirstBlockCacheConfig(threshold=100.0))
    y2, y1 = torch.tensor([1, 2]), torch.tensor([1])
    model(torch.randn(2, 4, 8, 8), torch.tensor([900.0, 900.0]), y2)
    x = torch.randn(1, 4, 8, 8)
    out = model(x, torch.tensor([800.0]), y1)
    accel.remove(model)
    assert torch.equal(out, model(x, torch.tensor([800.0]), y1))


def test_summary_reports_counters_and_percentiles():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig(threshold=0.5, first_blocks=2))
    run(model, [handle])
    s = accel.summary(model)["default"]
    assert s["method"] == "FirstBlockCacheConfig"
    rates = s["block_hit_rates"]
    assert rates[0] == rates[1] == 0.0 and rates[2] == rates[3] > 0
    assert rates[2] == pytest.approx(len(s["cached_steps"]) / 8)
    assert set(s["indicator_percentiles"]) == {"p10", "p50", "p90"}
    with pytest.raises(ValueError, match="has no adaptdiff.accel hooks"):
        accel.summary(tiny_dit())


def test_bad_configs():
    model = tiny_dit()
    with pytest.raises(ValueError, match="not an acceleration config"):
        accel.apply(model, object())
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="leave at least one"):
        accel.apply(model, FirstBlockCacheConfig(first_blocks=3, last_blocks=1))
    assert "forward" not in model.blocks[0].__dict__  # a failed apply leaves nothing behind
    with pytest.raises(ValueError, match="do not match"):
        accel.apply(model, ScheduleConfig(Schedule.full([["attn"]] * 4, 3)))


@pytest.mark.slow
def test_compiled_hooked_block_breaks_only_at_decisions():
    model = tiny_dit(depth=2)
    comps = accel.layout(model)
    sched = Schedule.full(comps, 3)
    sched.mask[1] = [[False, True] for _ in comps]
    handle = accel.apply(model, ScheduleConfig(sched))
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 16), torch.randn(2, 16)
    eager = []
    for _ in range(3):
        handle.ctx.step += 1
        eager.append(block(x, c))
    handle.reset()
    explain = torch._dynamo.explain(block)(x, c)
    # the block body is traced; every break is at the per-call schedule look-up
    assert explain.graph_break_count >= 1
    for br in explain.break_reasons:
        assert "ScheduleExecutor._cached" in br.reason, br.reason
    handle.reset()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager")
    for i in range(3):
        handle.ctx.step += 1
        torch.testing.assert_close(compiled(x, c), eager[i], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_with_first_block_cache_matches_eager():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig(threshold=0.5))
    eager = run(model, [handle])
    summary = accel.summary(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    labels = torch.tensor([1, 2])
    # counters and step numbers live outside the graph: no recompilation per step
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out = sample(
            compiled, (2, 4, 8, 8), method="euler", steps=8, guidance_scale=1.5,
            cond={"y": labels}, uncond={"y": torch.full_like(labels, model.null_label)},
            prediction="flow", accelerators=[handle], generator=torch.Generator().manual_seed(0),
            progress=False,
        )  # fmt: skip
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert accel.summary(model) == summary and summary["default"]["cached_steps"]
