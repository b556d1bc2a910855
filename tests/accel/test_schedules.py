"""Static schedules: JSON, producers (interval, A-SDM, BAC), ECAD's NSGA-II; what a reused
component returns and the error of reuse against dropping the component on the same steps."""

import contextlib
import itertools
import json
import random

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import Schedule, ScheduleConfig
from adaptdiff.accel.caching.ecad import (
    dominates,
    ecad_search,
    feature_fitness,
    non_dominated_sort,
    nsga2,
)
from adaptdiff.accel.caching.producers import (
    asdm_schedule,
    asdm_steps,
    bac_dp,
    bac_schedule,
    bubbling_union,
    collect_features,
    interval_schedule,
)

from .support import ReusePrediction, block_share, real_dit, rel_err, run, tiny_dit

COMPS = [["attn", "mlp"]] * 4


def test_json_round_trip_and_validation(tmp_path):
    model = tiny_dit()
    sched = interval_schedule(accel.layout(model), 6, 3)
    sched.model = {"class": "DiT", "blocks": 4}
    path = tmp_path / "s.json"
    sched.save(path)
    doc = json.loads(path.read_text())
    assert doc["mask"][1] == ["11", "00", "00", "11"] and doc["steps"] == 6
    again = Schedule.load(path, model=model)
    assert again.mask == sched.mask and again.meta["method"] == "interval"
    doc["mask"][2][1] = ["compute", "reuse"]
    assert Schedule.load(doc).mask[2][1] == [True, False]
    for key, value, msg in [
        ("version", 2, "version 2 unsupported"),
        ("format", "x", "not an adaptdiff schedule"),
        ("steps", 5, "steps is 5 but mask has 6"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Schedule.load({**doc, key: value})
    bad = json.loads(json.dumps(doc))
    bad["mask"][0][0] = "1"
    with pytest.raises(ValueError, match=r"mask\[0\]\[0\] must be 2 characters"):
        Schedule.load(bad)
    with pytest.raises(ValueError, match="do not match the model's"):
        Schedule.load(path, model=tiny_dit(depth=2))
    other = tiny_dit(hidden_size=32)  # same layout, another model
    with pytest.raises(ValueError, match="made for a model with parameters=5"):
        sched.model = {"class": "DiT", "blocks": 4, "parameters": 5}
        sched.check_model(other)
    with pytest.raises(ValueError, match="not found"):
        Schedule.load(tmp_path / "missing.json")


def test_genome_round_trip():
    sched = asdm_schedule(COMPS, 5, "unit", "alternate")
    bits = sched.genome()
    assert bits.numel() == 4 * 8
    assert Schedule.from_genome(COMPS, 5, bits).mask == sched.mask
    with pytest.raises(ValueError, match="genome has 3 bits"):
        Schedule.from_genome(COMPS, 5, [1, 0, 1])


def test_interval_schedule():
    sched = interval_schedule(COMPS, 7, 3, first_blocks=1, last_blocks=1, final_steps=1)
    reuse_steps = [s for s in range(7) if not all(all(e) for e in sched.mask[s])]
    assert reuse_steps == [1, 2, 4, 5]
    assert sched.mask[1][0] == [True, True] and sched.mask[1][1] == [False, False]
    assert sched.compute_fraction() == pytest.approx(1 - 4 * 2 * 2 / (7 * 8))


def test_asdm_granularities_and_modes():
    assert asdm_steps(10, "alternate") == [1, 3, 5, 7, 9]
    assert asdm_steps(10, "middle") == [4, 6]
    assert asdm_steps(10, "late") == [6, 7, 9]
    assert asdm_steps(10, "early") == [1, 3]
    comps = [["attn", "mlp"]] * 8
    layer = asdm_schedule(comps, 4, "layer", "alternate")
    assert [b for b in range(8) if layer.mask[1][b] == [False, False]] == [2, 3, 4, 5]
    assert layer.meta["modes"] == "adaptdiff"  # the timestep modes are not the paper's
    unit = asdm_schedule(comps, 4, "unit", "alternate", units=["mlp"])
    assert unit.mask[1][3] == [True, False] and unit.mask[1][0] == [True, True]
    block = asdm_schedule(comps, 4, "block", "alternate", groups=4)
    assert [b for b in range(8) if block.mask[3][b] == [False, False]] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="granularity"):
        asdm_schedule(comps, 4, "pixel")
    with pytest.raises(ValueError, match="mode must be one of"):
        asdm_schedule(comps, 4, mode="sometimes")


def _brute_force(S, budget):
    K = S.shape[0]
    best, arg = -float("inf"), None
    for rest in itertools.combinations(range(1, K), budget - 1):
        steps = [0, *rest]
        ends = [*steps[1:], K]
        score = sum(float(S[a, a:e].sum()) for a, e in zip(steps, ends, strict=True))
        if score > best:
            best, arg = score, steps
    return best, arg


def test_bac_dp_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for K in (1, 2, 5, 8):
        for trial in range(3):
            S = torch.rand(K, K, generator=gen, dtype=torch.float64)
            if trial == 1:  # BAC's template: similarity decaying with the step distance
                idx = torch.arange(K, dtype=torch.float64)
                S = torch.exp(-0.4 * (idx[:, None] - idx[None, :]).abs()) + 0.05 * S
            for budget in range(1, K + 1):
                steps = bac_dp(S, budget)
                best, _ = _brute_force(S, budget)
                ends = [*steps[1:], K]
                score = sum(float(S[a, a:e].sum()) for a, e in zip(steps, ends, strict=True))
                assert len(steps) == budget and steps[0] == 0
                assert score == pytest.approx(best, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="budget"):
        bac_dp(torch.eye(3), 4)


def test_bubbling_union():
    steps = {(0, "attn"): [0, 5], (0, "mlp"): [0, 2], (1, "attn"): [0, 3], (1, "mlp"): [0, 4]}
    vol = {(0, "attn"): 9.0, (0, "mlp"): 1.0, (1, "attn"): 8.0, (1, "mlp"): 0.5}
    out = bubbling_union(steps, vol, 2)
    assert out[(1, "attn")] == [0, 3, 4]  # + FFN of block 1
    assert out[(0, "attn")] == [0, 2, 4, 5]  # + FFNs of blocks 0 and 1
    assert out[(0, "mlp")] == [0, 2] and out[(1, "mlp")] == [0, 4]


def test_bac_schedule_from_features():
    model = tiny_dit()
    feats = collect_features(model, lambda: run(model, steps=6))
    assert feats[(0, "attn")].shape[0] == 6
    sched = bac_schedule(accel.layout(model), feats, budget=3, num_bu_blocks=2, final_steps=1)
    assert sched.num_steps == 6 and all(all(e) for e in sched.mask[0] + sched.mask[5])
    for b, c in itertools.product(range(4), range(2)):
        assert sum(sched.mask[s][b][c] for s in range(5)) >= 3
    handle = accel.apply(model, ScheduleConfig(sched))
    out = run(model, [handle], steps=6)
    assert torch.isfinite(out).all() and accel.summary(model)["default"]["hits"] > 0


def test_nsga2_returns_a_non_dominated_front():
    n = 12
    w1 = torch.tensor([random.Random(i).random() for i in range(n)])

    def evaluate(bits):  # conflicting: weighted ones vs zeros
        b = bits.double()
        return float((w1 * b).sum()), float(((1 - b) * (1 + w1.flip(0))).sum())

    front = nsga2(evaluate, n, pop_size=20, generations=20, seed=1, progress=False)
    objs = front.objectives
    assert len(objs) >= 3
    for a, b in itertools.permutations(objs, 2):
        assert not dominates(a, b)
    assert objs == sorted(objs)
    assert len(front.history) == 20
    # compare with the true front of all 2^12 genomes (a 2-D sweep)
    every = sorted(
        evaluate(torch.tensor([(i >> k) & 1 for k in range(n)], dtype=torch.bool))
        for i in range(2**n)
    )
    true_front, best2 = [], float("inf")
    for o in every:
        if o[1] < best2:
            true_front.append(o)
            best2 = o[1]
    optimal = [o for o in objs if not any(dominates(t, o) for t in true_front)]
    assert len(optimal) >= len(objs) // 2
    assert non_dominated_sort([(1, 2), (2, 1), (2, 2), (3, 3)]) == [[0, 1], [2], [3]]


def test_ecad_search_on_tiny_dit():
    model = tiny_dit(depth=2)
    schedules, front = ecad_search(
        model, lambda accs: run(model, accs, steps=4), 4, pop_size=6, generations=2, progress=False
    )
    assert schedules and all(s.num_steps == 4 for s in schedules)
    fractions = [s.meta["compute_fraction"] for s in schedules]
    losses = [s.meta["quality_loss"] for s in schedules]
    assert losses == sorted(losses) and fractions == sorted(fractions, reverse=True)
    assert all(f < 1 for f in fractions)  # the constraint: every schedule reuses something
    # a pluggable fitness: distance of (here) per-image means instead of PSNR
    fitness = feature_fitness(lambda x: x.mean((1, 2, 3)))
    schedules, _ = ecad_search(
        model, lambda accs: run(model, accs, steps=4), 4, fitness=fitness, pop_size=4,
        generations=1, progress=False,
    )  # fmt: skip
    assert all(s.meta["quality_loss"] >= 0 for s in schedules)


def _mixed_schedule(model, steps=8):
    """DeepCache-like whole deep blocks every third call, plus single components elsewhere."""
    sched = interval_schedule(accel.layout(model), steps, 3)
    sched.mask[3][0] = [True, False]  # block 0's MLP reused alone
    sched.mask[6][3] = [False, True]  # block 3's attention reused alone
    return sched


class ComponentSpy:
    """The output of every component (``block.attn``, ``block.mlp``) per model call."""

    def __init__(self, model):
        self.outputs = []  # [call][block][component]
        comps = accel.layout(model)
        self.handles = [model.register_forward_pre_hook(lambda m, a: self.outputs.append(
            [[None] * len(c) for c in comps]))]  # fmt: skip
        for b, (block, names) in enumerate(zip(model.blocks, comps, strict=True)):
            for c, name in enumerate(names):
                self.handles.append(getattr(block, name).register_forward_hook(self._keep(b, c)))

    def _keep(self, b, c):
        def hook(module, args, out):
            self.outputs[-1][b][c] = out.clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_a_reused_component_returns_the_previous_calls_output():
    model = real_dit()
    sched = _mixed_schedule(model)
    spy = ComponentSpy(model)
    handle = accel.apply(model, ScheduleConfig(sched))
    run(model, [handle], steps=8)
    accel.remove(model)
    spy.remove()
    out, reused = spy.outputs, 0
    assert len(out) == 8
    for s in range(1, 8):
        for b in range(4):
            for c in range(2):
                if sched.mask[s][b][c]:  # computed: a new input gives a new output
                    assert not torch.equal(out[s][b][c], out[s - 1][b][c]), (s, b, c)
                else:  # reused: exactly the previous call's output, not a zero or a recompute
                    assert torch.equal(out[s][b][c], out[s - 1][b][c]), (s, b, c)
                    assert out[s][b][c].abs().mean() > 0.1
                    reused += 1
    assert reused == 5 * 2 * 2 + 2


@contextlib.contextmanager
def _dropped(model, sched):
    """The zero-update baseline: every component the schedule reuses outputs zeros instead."""
    calls = [-1]
    handles = [model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))]
    for b, (block, names) in enumerate(zip(model.blocks, sched.components, strict=True)):
        for c, name in enumerate(names):

            def hook(module, args, out, b=b, c=c):
                return torch.zeros_like(out) if not sched.mask[calls[0]][b][c] else out

            handles.append(getattr(block, name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_reusing_components_beats_dropping_them_and_reusing_the_prediction():
    model = real_dit()
    assert block_share(model) > 0.5  # the blocks carry the output: their reuse matters
    sched = _mixed_schedule(model)
    plain = run(model, steps=8)
    handle = accel.apply(model, ScheduleConfig(sched))
    out = run(model, [handle], steps=8)
    accel.remove(model)
    with _dropped(model, sched):
        dropped = run(model, steps=8)
    # the calls that reuse the deep blocks, their whole prediction reused instead
    reuse = run(model, [ReusePrediction([1, 2, 4, 5, 7])], steps=8)
    err, err_drop, err_reuse = rel_err(out, plain), rel_err(dropped, plain), rel_err(reuse, plain)
    assert 0 < err < err_drop / 5 and err < err_reuse / 2, (err, err_drop, err_reuse)
