"""One ``sample`` call combining a solver, AG / LinearAG, RAS, a cache or schedule and SADA."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel import FirstBlockCacheConfig, Schedule, ScheduleConfig, TaylorSeerConfig
from adaptdiff.accel.guidance.adaptive import (
    AdaptiveGuidance,
    LinearAG,
    TrajectoryRecorder,
)
from adaptdiff.accel.steps.sada import SADA
from adaptdiff.accel.tokens.ras import RAS, RASConfig
from adaptdiff.samplers import sample

from ..accel.support import tiny_dit

STEPS = 8


class AlwaysStable(SADA):
    """SADA whose criterion always allows a skip: deterministic skipped steps (one skip in a
    row, no late phase)."""

    def __init__(self, **kwargs):
        super().__init__(**{"max_skips": 1, "lagrange_from": None, **kwargs})

    def _momentum(self, step):
        m = super()._momentum(step)
        return None if m is None else torch.zeros_like(m)


def _noise(model, n=2, seed=0):
    size = model.config.input_size
    return torch.randn(
        n, model.in_channels, size, size, generator=torch.Generator().manual_seed(seed)
    )


def _run(model, accs=(), method="euler", labels=(1, 2), x=None, info=False):
    y = torch.tensor(labels)
    return sample(
        model, _noise(model, len(labels)) if x is None else x, method=method, steps=STEPS,
        guidance_scale=1.5, cond={"y": y}, uncond={"y": torch.full_like(y, model.null_label)},
        prediction="flow", accelerators=list(accs), progress=False, return_info=info,
    )  # fmt: skip


def _guided_dit():
    """A tiny DiT whose labels matter enough that AG (threshold 0.975) switches some samples:
    with noise seed 0, sample 1 (label 2) at step 0 and never sample 0 (label 1)."""
    model = tiny_dit()
    with torch.no_grad():
        model.y_embedder.embedding_table.weight.mul_(10.0)
    return model


def _calls(method):
    return 2 * STEPS - 1 if method == "heun" else STEPS


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_neutral_parts_equal_plain_cfg_bit_for_bit(method):
    model = tiny_dit()
    plain = _run(model, method=method)
    ras = RAS(model, sample_ratio=1.0)
    handle = accel.apply(model, ScheduleConfig(Schedule.for_model(model, _calls(method))))
    accs = [AdaptiveGuidance(1.5), ras, handle, SADA(criterion="off")]
    out, info = _run(model, accs, method=method, info=True)
    assert torch.equal(out, plain)
    assert info["nfe"] == _calls(method)
    assert accel.summary(model)["default"]["misses"] == _calls(method) * 4 * 2
    ras.remove()
    accel.remove(model)


def test_ag_and_a_cache_both_act():
    model = _guided_dit()
    ag = AdaptiveGuidance(0.975)
    accel.apply(model, FirstBlockCacheConfig(threshold=0.3))
    _, info = _run(model, [ag, accel.get_handle(model)], info=True)
    s = accel.summary(model)["default"]
    assert ag.switched_at.tolist() == [-1, 0]
    assert info["nfe_per_sample"] == (4 + 3 * (STEPS - 1)) / 2  # then 3 rows: c0, c1, u0
    assert s["hits"] > 0 and s["model_calls"] == STEPS
    accel.remove(model)


@pytest.mark.parametrize("guidance", ["ag", "linear_ag"])
def test_a_schedule_follows_the_rows_guidance_drops(guidance):
    """A static schedule's reuse is decided per call, so with AG (noise seed 2: sample 0 leaves
    the uncond half at step 0, sample 1 at step 6) or LinearAG (cond-only steps) every sample
    comes out as when it is sampled alone: reused outputs are taken row by row."""
    model = _guided_dit()
    comps = accel.layout(model)
    sched = Schedule.for_model(model, STEPS)
    for s in (1, 2, 3, 5, 7):
        sched.mask[s] = [[False, s % 2 == 1] for _ in comps]
    handle = accel.apply(model, ScheduleConfig(sched))

    def guide():
        if guidance == "ag":
            return AdaptiveGuidance(0.975)
        return LinearAG({i: [0.5, 0.2, 0.3] for i in (2, 4, 6)}, history=1, steps=(2, 4, 6))

    x = _noise(model, seed=2)
    g = guide()
    both = _run(model, [g, handle], x=x)
    hits = accel.summary(model)["default"]["hits"]
    assert hits == (5 + 1) * len(comps)  # every planned reuse: 5 attention steps, 1 mlp
    if guidance == "ag":
        assert g.switched_at.tolist() == [0, 6]
    for i, label in enumerate((1, 2)):
        alone = _run(model, [guide(), handle], labels=(label,), x=x[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    accel.remove(model)


def test_ras_and_a_schedule_both_act_the_schedule_on_dense_calls_only():
    model = tiny_dit()
    comps = accel.layout(model)
    sched = Schedule.for_model(model, STEPS)
    for s in (1, 2, 4, 5):  # steps 1 and 5 are dense for RAS, 2 and 4 are RAS steps
        sched.mask[s] = [[False, True] for _ in comps]  # reuse every attention
    ras = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    handle = accel.apply(model, ScheduleConfig(sched))
    out = _run(model, [ras, handle])
    s = accel.summary(model)["default"]
    # A dense call whose attention the schedule reused stores no K/V, so the RAS step after it
    # runs dense to fill them: steps 1 and 2 (both reuse attention) leave them empty, step 3
    # fills, step 4 is RAS; step 5 reuses, 6 fills, 7 is RAS.
    assert [r["ras"] for r in ras.records] == [False] * 4 + [True] + [False] * 2 + [True]
    dense_calls = 6  # the schedule counts its components on them only
    assert s["hits"] == 3 * len(comps) and s["hits"] + s["misses"] == dense_calls * 2 * len(comps)
    ras_only = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    accel.remove(model)
    assert not torch.equal(out, _run(model, [ras_only]))  # the schedule changed something
    ras.remove()
    ras_only.remove()


@pytest.mark.parametrize("ras_last", [True, False])
def test_ras_through_the_hook_api_with_a_schedule(ras_last):
    model = tiny_dit()
    comps = accel.layout(model)
    sched = Schedule.for_model(model, STEPS)
    for s in (1, 4):  # a dense step and a RAS step
        sched.mask[s] = [[False, True] for _ in comps]
    configs = [ScheduleConfig(sched), RASConfig(sample_ratio=0.5, start_step=2)]
    handle = accel.apply(model, *(configs if ras_last else configs[::-1]))
    _run(model, [handle])
    s = accel.summary(model)["default"]
    # Step 1 reused attention, so it kept no K/V: step 2 runs dense to fill them.
    assert s["ras"]["ras_calls"] == STEPS - 3
    assert s["hits"] == len(comps) and s["hits"] + s["misses"] == 3 * 2 * len(comps)
    accel.remove(model)


def test_ras_and_an_online_cache_run_in_either_order():
    for ras_first in (True, False):
        model = tiny_dit()
        if ras_first:
            ras = RAS(model, sample_ratio=0.5, start_step=3)
        handle = accel.apply(model, TaylorSeerConfig(interval=2, warmup_steps=1))
        if not ras_first:
            ras = RAS(model, sample_ratio=0.5, start_step=3)
        out = _run(model, [handle, ras])
        assert torch.isfinite(out).all()
        # TaylorSeer forecast step 2, the dense step before RAS's first: no K/V were kept, so
        # step 3 runs dense to fill them and RAS runs from step 4.
        assert [r["ras"] for r in ras.records] == [False] * 4 + [True] * (STEPS - 4)
        assert accel.summary(model)["default"]["cached_steps"] == [2]  # dense steps 0..3 only


@pytest.mark.parametrize("seed", [0, 2])
def test_ras_follows_the_rows_adaptive_guidance_drops(seed):
    """Noise seed 0: sample 1 leaves the uncond half at step 0 and the rows left are a prefix
    of RAS's K/V caches; seed 2: sample 0 leaves at step 0 (the caches shrink), then sample 1
    at step 6 (cond rows only). Every sample comes out as when it is sampled alone, so the
    per-row K/V caches followed the rows."""
    model = _guided_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=2)
    x = _noise(model, seed=seed)
    ag = AdaptiveGuidance(0.975)
    both = _run(model, [ag, ras], x=x)
    assert ras.summary()["ras_calls"] == STEPS - 2
    assert ag.switched_at.tolist() == ([-1, 0] if seed == 0 else [0, 6])
    for i, label in enumerate((1, 2)):
        alone = _run(model, [AdaptiveGuidance(0.975), ras], labels=(label,), x=x[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    ras.remove()


@pytest.mark.parametrize("variant", ["heun", "hook api", "diffusers"])
def test_ras_follows_the_rows_adaptive_guidance_drops_everywhere(variant):
    """As above with Heun (a switch between a step's two calls), RAS through accel.apply, and
    a diffusers DiT (its K and V caches are a pair)."""
    if variant == "diffusers":
        from ..accel.test_ras import DiffusersAdapter, diffusers_model

        transformer = diffusers_model("dit")
        model, threshold, seed, null = DiffusersAdapter(transformer, "dit"), 0.98, 0, 10
    else:
        transformer = model = _guided_dit()
        threshold, seed, null = 0.975, 2, model.null_label
    config = RASConfig(sample_ratio=0.5, start_step=2)
    if variant == "hook api":
        ras = accel.apply(model, config)
    else:
        ras = RAS(transformer, config)
    method = "heun" if variant == "heun" else "euler"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))

    def run(rows, ag):
        y = torch.tensor([1, 2])[rows]
        return sample(
            model, x[rows], method=method, steps=STEPS, guidance_scale=1.5, cond={"y": y},
            uncond={"y": torch.full_like(y, null)}, prediction="flow", accelerators=[ag, ras],
            progress=False,
        )  # fmt: skip

    ag = AdaptiveGuidance(threshold)
    both = run(slice(0, 2), ag)
    assert ag.switched_at[0] >= 0  # the first row leaves: the K/V caches shrink
    for i in range(2):
        alone = run(slice(i, i + 1), AdaptiveGuidance(threshold))
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    if variant == "hook api":
        accel.remove(model)
    else:
        ras.remove()


def test_sada_and_ag_both_act():
    model = _guided_dit()
    ag, sada = AdaptiveGuidance(0.975), AlwaysStable(start=0.0, end=1.0)
    _, info = _run(model, [ag, sada], info=True)
    assert sada.skipped == [3, 5, 7] and ag.switched_at.tolist() == [-1, 0]
    assert info["nfe"] == STEPS - 3


def test_cache_steps_follow_the_solver_when_sada_skips():
    """A cache's step counter is the solver's step, not the count of calls made: TaylorSeer
    (interval 3 after 2 warm-up calls) caches steps 4 and 6 whichever steps SADA skipped."""
    model = tiny_dit()
    sada = AlwaysStable(start=0.0, end=1.0)
    handle = accel.apply(model, TaylorSeerConfig(interval=3, order=1, warmup_steps=2))
    out = _run(model, [sada, handle])
    s = accel.summary(model)["default"]
    assert sada.skipped == [3, 5, 7]
    assert s["cached_steps"] == [4, 6] and s["model_calls"] == STEPS - 3
    assert torch.isfinite(out).all()


def test_sada_and_ras_in_either_order():
    """Step skippers are asked first: RAS picks no tokens for (and counts nothing of) a step
    SADA skips, whichever comes first in the list."""
    model = tiny_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=2)
    outs, drops = [], []
    for ras_first in (True, False):
        sada = AlwaysStable(start=0.0, end=1.0, per_sample=False)  # per sample: refused
        outs.append(_run(model, [ras, sada] if ras_first else [sada, ras]))
        drops.append(ras.drop_count.clone())
        assert sada.skipped == [3, 5, 7] and ras.summary()["ras_calls"] == 3  # steps 2, 4, 6
    assert torch.equal(outs[0], outs[1]) and torch.equal(drops[0], drops[1])
    ras.remove()


@pytest.mark.parametrize("method", ["euler", "dpmpp_2m"])
def test_ag_ras_schedule_and_sada_all_act_in_one_call(method):
    model = _guided_dit()
    comps = accel.layout(model)
    sched = Schedule.for_model(model, STEPS)
    for s in (1, 4):  # dense steps for RAS (warm-up, error reset), computed by SADA
        sched.mask[s] = [[True, False] for _ in comps]  # reuse every MLP (attention keeps K/V)
    ag, sada = AdaptiveGuidance(0.975), AlwaysStable(start=0.0, end=1.0, per_sample=False)
    ras = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(4,))
    handle = accel.apply(model, ScheduleConfig(sched))
    out, info = _run(model, [ag, ras, handle, sada], method=method, info=True)
    assert torch.isfinite(out).all()
    assert (ag.switched_at >= 0).sum() == 1
    assert sada.skipped == [3, 5, 7] and info["nfe"] == STEPS - 3
    assert ras.summary()["ras_calls"] == 2  # steps 2 and 6
    # step 1 reuses step 0's outputs of the rows AG kept, step 4 step 1's
    assert accel.summary(model)["default"]["hits"] == 2 * len(comps)
    accel.remove(model)
    ras.remove()


def _refused(model):
    """(accelerators, method, message) of combinations ``sample`` must refuse."""
    lag = LinearAG({i: [1.0, 0.0, 0.0] for i in range(1, STEPS)}, history=1, num_steps=STEPS)
    sada = SADA()
    return {
        "ag+linear_ag": ([AdaptiveGuidance(), lag], "euler", "AdaptiveGuidance cannot be "
                         "combined with LinearAG: both replace unconditional evaluations"),
        "sada+sada": ([SADA(), SADA()], "euler", "SADA cannot be combined with SADA: both skip "
                      "whole solver steps"),
        "sada+linear_ag": ([sada, lag], "euler", "SADA cannot be combined with LinearAG: "
                           "LinearAG uses every step's computed predictions"),
        "sada+heun": ([sada], "heun", "SADA cannot be combined with method 'heun'"),
        "linear_ag+heun": ([lag], "heun", "LinearAG cannot be combined with method 'heun'"),
        "linear_ag steps": ([LinearAG({1: [1.0, 0.0, 0.0]}, num_steps=6)], "euler",
                            "LinearAG was fitted for 6 steps but method 'euler' with 8 steps"),
        "schedule steps": (
            [accel.apply(model, ScheduleConfig(Schedule.for_model(model, STEPS)))], "heun",
            "ScheduleConfig was made for 8 calls but method 'heun' with 8 steps makes 15 calls",
        ),
        "sada tokens+ras": ([SADA(tokens=True), RAS(model)], "euler", "SADA\\(tokens=True\\) "
                            "cannot be combined with RAS: both run the transformer blocks on a "
                            "subset of the tokens"),
        "sada tokens+ag": ([AdaptiveGuidance(), SADA(tokens=True)], "euler", "keeps per-row "
                           "caches of the model batch and AdaptiveGuidance changes the rows"),
        "linear_ag+ras": ([lag, RAS(model)], "euler", "LinearAG cannot be combined with RAS: "
                          "LinearAG regresses on past predictions of both branches"),
        "recorder+ag": ([TrajectoryRecorder(), AdaptiveGuidance()], "euler",
                        "TrajectoryRecorder needs both branches at every step"),
        "twice": ([sada, sada], "euler", "SADA is passed twice"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_refused(tiny_dit())))
def test_conflicting_combinations_are_refused_before_the_first_step(case):
    model = tiny_dit()
    accs, method, message = _refused(model)[case]
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        _run(model, accs, method=method)
    assert not calls


def test_sada_tokens_and_a_cache_are_refused():
    model = tiny_dit()
    handle = accel.apply(model, FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="FirstBlockCacheConfig reuses block outputs by position"):
        _run(model, [SADA(tokens=True), handle])


def test_ras_made_after_a_schedule_is_refused():
    model = tiny_dit()
    handle = accel.apply(model, ScheduleConfig(Schedule.for_model(model, STEPS)))
    ras = RAS(model, sample_ratio=0.5)
    with pytest.raises(ValueError, match="Make the RAS first, or pass RASConfig to apply"):
        _run(model, [ras, handle])
    ras.remove()
    neutral = RAS(model, sample_ratio=1.0)  # its attention calls the schedule's: no conflict
    assert torch.equal(_run(model, [neutral, handle]), _run(tiny_dit()))


def test_ag_and_ras_on_a_joint_attention_model_are_refused():
    from ..accel.test_ras_joint import model_for

    transformer, adapter = model_for("sd3")
    ras = RAS(transformer, sample_ratio=0.5)
    y = {"text": torch.randn(2, 5, 16), "pooled": torch.randn(2, 8)}
    null = {"text": torch.zeros(2, 5, 16), "pooled": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match="AdaptiveGuidance cannot be combined with RAS on sd3"):
        sample(
            adapter, (2, 4, 8, 8), method="euler", steps=STEPS, guidance_scale=1.5, cond=y,
            uncond=null, prediction="flow", accelerators=[AdaptiveGuidance(), ras],
            progress=False,
        )  # fmt: skip
    ras.remove()


# -- the same table through accel.apply(model, *configs) and sample(accelerators=[handle])

LAG = {i: [0.5, 0.2, 0.3] for i in (2, 4, 6)}


def _schedule(model, method):
    """A schedule that reuses every attention on calls 1 and 4 (RAS: a dense step and a RAS
    step; K/V are refilled by the dense step after)."""
    sched = Schedule.for_model(model, _calls(method))
    for s in (1, 4):
        sched.mask[s] = [[False, True] for _ in accel.layout(model)]
    return sched


def _config(name, model, method, names=()):
    """(the config, the same method as a standalone accelerator or None for model-level ones);
    SADA with RAS on the whole-batch rule (per sample it is refused with RAS)."""
    if name == "ag":
        return accel.AdaptiveGuidanceConfig(0.975), AdaptiveGuidance(0.975)
    if name == "linear_ag":
        return accel.LinearAGConfig(LAG, steps=(2, 4, 6)), LinearAG(LAG, steps=(2, 4, 6))
    if name == "sada":
        kw = dict(start=0.0, end=1.0, per_sample="ras" not in names)
        return accel.SADAConfig(**kw), SADA(**kw)
    if name == "ras":
        cfg = RASConfig(sample_ratio=0.5, start_step=2)
        return cfg, RAS(model, cfg)  # made before the model-level hooks
    if name == "cache":
        return TaylorSeerConfig(interval=2, warmup_steps=1), None
    return ScheduleConfig(_schedule(model, method)), None


ALLOWED = {
    "ag": "heun", "ras": "heun", "cache": "heun", "schedule": "heun",
    "ag+cache": "euler", "ag+schedule": "dpmpp_2m", "linear_ag+schedule": "euler",
    "linear_ag+cache": "euler", "ag+ras": "euler", "ras+cache": "euler",
    "ras+schedule": "euler", "sada+ag": "euler", "sada+ras": "euler", "sada+cache": "euler",
    "sada+schedule": "euler", "ag+ras+schedule+sada": "euler",
}  # fmt: skip


@pytest.mark.parametrize("combo", list(ALLOWED))
def test_allowed_combinations_run_through_one_handle(combo):
    """Every allowed combination installed by one ``accel.apply`` samples bit for bit as the
    same methods passed as standalone accelerators (with the model-level ones in a handle)."""
    method, names = ALLOWED[combo], combo.split("+")
    model = _guided_dit()
    pairs = [_config(n, model, method, names) for n in names]
    standalone = [acc for _, acc in pairs if acc is not None]
    model_level = [cfg for cfg, acc in pairs if acc is None]
    handle = accel.apply(model, *model_level) if model_level else None
    expected = _run(model, standalone + ([handle] if handle else []), method=method)
    expected_summary = accel.summary(model)["default"] if handle else None
    accel.remove(model)
    for acc in standalone:
        if isinstance(acc, RAS):
            acc.remove()

    handle = accel.apply(model, *[cfg for cfg, _ in pairs])
    out, info = _run(model, [handle], method=method, info=True)
    summary = accel.summary(model)["default"]
    accel.remove(model)
    assert torch.equal(out, expected)
    if expected_summary is not None:
        assert summary["hits"] == expected_summary["hits"]
    for name, (_, acc) in zip(names, pairs, strict=True):
        if name == "ag":
            assert summary["adaptive_guidance"]["switched_at"] == acc.switched_at.tolist()
        elif name == "sada":
            assert summary["sada"]["skipped"] == acc.skipped
        elif name == "ras":
            assert summary["ras"]["ras_calls"] == acc.summary()["ras_calls"] > 0
    assert torch.equal(_run(model, method=method), _run(_guided_dit(), method=method))


def _refused_configs(model):
    """The refused cases of :func:`_refused` that configs express: (configs, method)."""
    lag = accel.LinearAGConfig({i: [1.0, 0.0, 0.0] for i in range(1, STEPS)}, num_steps=STEPS)
    return {
        "ag+linear_ag": ([accel.AdaptiveGuidanceConfig(), lag], "euler"),
        "sada+sada": ([accel.SADAConfig(), accel.SADAConfig()], "euler"),
        "sada+linear_ag": ([accel.SADAConfig(), lag], "euler"),
        "sada+heun": ([accel.SADAConfig()], "heun"),
        "linear_ag+heun": ([lag], "heun"),
        "linear_ag steps": ([accel.LinearAGConfig({1: [1.0, 0.0, 0.0]}, num_steps=6)], "euler"),
        "schedule steps": ([ScheduleConfig(Schedule.for_model(model, STEPS))], "heun"),
        "sada tokens+ras": ([accel.SADAConfig(tokens=True), RASConfig()], "euler"),
        "sada tokens+ag": ([accel.AdaptiveGuidanceConfig(), accel.SADAConfig(tokens=True)],
                           "euler"),
        "linear_ag+ras": ([lag, RASConfig()], "euler"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_refused_configs(tiny_dit())))
def test_conflicting_configs_are_refused_through_one_handle(case):
    model = tiny_dit()
    configs, method = _refused_configs(model)[case]
    message = _refused(tiny_dit())[case][2]
    handle = accel.apply(model, *configs)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        _run(model, [handle], method=method)
    assert not calls
    accel.remove(model)


def test_refused_through_one_handle_sada_tokens_with_a_cache_and_a_handle_twice():
    model = tiny_dit()
    handle = accel.apply(model, accel.SADAConfig(tokens=True), FirstBlockCacheConfig())
    with pytest.raises(ValueError, match="FirstBlockCacheConfig reuses block outputs by position"):
        _run(model, [handle])
    with pytest.raises(ValueError, match="AccelHandle is passed twice"):
        _run(model, [handle, handle])
    accel.remove(model)


def test_ag_and_ras_on_a_joint_attention_model_are_refused_through_one_handle():
    from ..accel.test_ras_joint import model_for

    transformer, adapter = model_for("sd3")
    handle = accel.apply(transformer, accel.AdaptiveGuidanceConfig(), RASConfig(sample_ratio=0.5))
    y = {"text": torch.randn(2, 5, 16), "pooled": torch.randn(2, 8)}
    null = {"text": torch.zeros(2, 5, 16), "pooled": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match="AdaptiveGuidance cannot be combined with RAS on sd3"):
        sample(
            adapter, (2, 4, 8, 8), method="euler", steps=STEPS, guidance_scale=1.5, cond=y,
            uncond=null, prediction="flow", accelerators=[handle], progress=False,
        )  # fmt: skip
    accel.remove(transformer)
