"""RAS steps without host synchronisation and with static shapes: bit-identical to the earlier
implementation (argsort selection, caches allocated afresh), no host read of tensor values in a
step, the same buffers from step to step and run to run, a step traced by
``torch.compile(fullgraph=True)``, and :class:`RASStepGraph` (eager on the CPU, refused there
with ``capture=True``, captured on CUDA)."""

from collections import deque

import pytest
import torch

from adaptdiff.accel.tokens.ras import RAS, RASConfig
from adaptdiff.accel.tokens.ras_graph import RASStepGraph
from adaptdiff.samplers import ModelStep, SampleContext, sample

from .test_ras import random_dit, run

pytestmark = pytest.mark.usefixtures("one_thread")


class ArgsortRAS(RAS):
    """RAS as the earlier implementation did it: the selection verbatim (a full argsort), a
    scatter-add of ones for the cached patches' starvation counts, a fresh mask, and the K/V
    caches and index buffers allocated afresh on every dense step instead of refilled."""

    def before_model(self, step):
        if self.ras_run and self.skips[step.index] == 0:
            self.state.kv.clear()
            self._buffers = {"drop_count": self.drop_count}
        return super().before_model(step)

    def _select(self, skip):
        cfg = self.config
        if cfg.metric == "random":
            B, n = self.drop_count.shape
            scores = torch.rand(B, n, generator=self.generator, device=self.drop_count.device)
        else:
            pred = self.last_pred
            if self.sequence:
                pred = pred.transpose(1, 2).unsqueeze(-1)
            scores = torch.ops.adaptdiff.patch_scores(pred, self.patch_size, cfg.metric)
        if cfg.starvation_scale:
            factor = torch.exp(cfg.starvation_scale * self.drop_count)
            scores = scores * factor if cfg.starvation == "reference" else scores / factor
        order = scores.argsort(dim=1)  # ascending
        high = int(skip * cfg.high_ratio)
        low = skip - high
        n = order.shape[1]
        return order[:, low : n - high].sort(dim=1).values

    def _mark(self, active):
        n = self.drop_count.shape[1]
        keep = torch.zeros_like(self.drop_count, dtype=torch.bool).scatter_(1, active, True)
        cached = torch.arange(n, device=keep.device).expand_as(keep)[~keep].view(len(keep), -1)
        self.drop_count.scatter_add_(1, cached, torch.ones_like(cached, dtype=torch.float32))
        self.active_mask = keep


CONFIGS = {
    "std": dict(sample_ratio=0.5, start_step=2, error_reset_steps=(5,)),
    "l2": dict(sample_ratio=0.5, metric="l2", start_step=2),
    "random": dict(sample_ratio=0.5, metric="random", start_step=2),
    "high0.7": dict(sample_ratio=0.4, start_step=1, high_ratio=0.7),
    "high0": dict(sample_ratio=0.4, start_step=1, high_ratio=0.0),
    "reference-starvation": dict(sample_ratio=0.6, start_step=1, starvation="reference"),
    "ramp": dict(sample_ratio=0.5, start_step=1, skip_num_step=2, skip_num_step_length=2),
}


def start(ras, x, steps=6, accelerators=None, guidance=1.0):
    """What ``sample`` does before the first step (the steps below run one branch)."""
    ctx = SampleContext(
        model=None, schedule=None, prediction="flow", method="euler",
        timesteps=torch.linspace(1.0, 0.0, steps + 1, device=x.device), cond={},
        guidance_scale=guidance,
        uncond=None if guidance == 1.0 else {}, x=x,
    )  # fmt: skip
    ras.connect(ctx, [ras] if accelerators is None else accelerators)
    ras.on_sample_start(ctx)
    return ctx


def step(ras, ctx, model, index, x, y):
    """One solver step as ``sample`` makes it: before_model, the model call, after_model."""
    t = ctx.timesteps[index]
    s = ModelStep(
        index=index, call=0, t=t, alpha=1 - t, sigma=t, x=x, ctx=ctx, branches=["cond"],
        guidance_scale=1.0, history=deque(),
    )  # fmt: skip
    ras.before_model(s)
    s.batch_slots = torch.arange(x.shape[0])
    pred = model(x, t.expand(x.shape[0]), y)
    s.evaluated = True
    return ras.after_model(s, pred)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_are_bit_identical_to_the_argsort_selection(name, method):
    """Whole runs (guidance, batch 3) against the earlier implementation: the same samples bit
    for bit and the same starvation counts."""
    model = random_dit()
    outs = []
    for cls in (RAS, ArgsortRAS):
        ras = cls(model, RASConfig(**CONFIGS[name]))
        with torch.no_grad():
            outs.append((run(model, [ras], method=method), ras.drop_count.clone()))
        assert ras.summary()["ras_calls"] > 0
        ras.remove()
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_on_diffusers_and_joint_attention_the_outputs_are_bit_identical_too():
    from . import test_ras_joint as joint
    from .test_ras import DiffusersAdapter, diffusers_model

    transformer = diffusers_model("dit")
    model = DiffusersAdapter(transformer, "dit")
    outs = []
    for cls in (RAS, ArgsortRAS):
        ras = cls(transformer, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
        with torch.no_grad():
            outs.append(run(model, [ras]))
        ras.remove()
    assert torch.equal(outs[0], outs[1])
    transformer, model = joint.model_for("flux")  # token sequences, text rows in the caches
    outs = []
    for cls in (RAS, ArgsortRAS):
        ras = cls(transformer, sample_ratio=0.5, start_step=2)
        outs.append(joint.run(model, "flux", [ras], steps=6))
        ras.remove()
    assert torch.equal(outs[0], outs[1])


def test_the_selection_is_the_argsort_selection():
    """The top-k selection keeps the same patches as sorting every score (no ties here)."""
    torch.manual_seed(0)
    model = random_dit()
    for high_ratio in (1.0, 0.0, 0.5):
        ras = RAS(model, sample_ratio=0.25, high_ratio=high_ratio)
        ras.last_pred, ras.sequence = torch.randn(3, 4, 8, 8), False
        ras.drop_count = torch.rand(3, 16).mul_(4).floor_()
        drop = ras.drop_count.clone()
        skip = 11
        active = ras._select(skip)
        ras._mark(active)
        scores = torch.ops.adaptdiff.patch_scores(ras.last_pred, 2, "std")
        scores = scores / torch.exp(0.1 * drop)
        order = scores.argsort(dim=1)
        high = int(skip * high_ratio)
        want = order[:, skip - high : 16 - high].sort(dim=1).values
        assert torch.equal(active, want), high_ratio
        cached = torch.ones(3, 16, dtype=torch.bool).scatter_(1, want, False)
        assert torch.equal(ras.drop_count, drop + cached)
        ras.remove()


NO_HOST_READS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy")


@pytest.mark.parametrize("metric, high_ratio", [("std", 1.0), ("random", 0.5), ("l2", 0.0)])
def test_a_ras_step_reads_no_tensor_value_on_the_host(monkeypatch, metric, high_ratio):
    """Selection, the model call (gather, K/V refill, attention on the caches, scatter) and the
    merge: no .item(), .tolist(), .nonzero(), truth value, torch.equal or boolean indexing."""
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=1, metric=metric, high_ratio=high_ratio)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    ctx = start(ras, x)
    with torch.no_grad():
        step(ras, ctx, model, 0, x, y)  # dense: fills the K/V caches

        def refuse(name):
            def fail(*args, **kwargs):
                raise AssertionError(f"a RAS step called {name}")

            return fail

        for name in NO_HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("nonzero", "equal", "masked_select", "unique"):
            monkeypatch.setattr(torch, name, refuse(f"torch.{name}"))
        getitem = torch.Tensor.__getitem__

        def no_mask_index(self, index):
            items = index if isinstance(index, tuple) else (index,)
            for i in items:
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    raise AssertionError("a RAS step indexed with a boolean mask")
            return getitem(self, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask_index)
        out = [step(ras, ctx, model, s, x, y) for s in (1, 2)]
        monkeypatch.undo()
    assert [r["ras"] for r in ras.records] == [False, True, True]
    assert all(torch.isfinite(o).all() for o in out)


def _pointers(ras):
    kv = [
        t.data_ptr() for v in ras.state.kv.values() for t in (v if isinstance(v, tuple) else (v,))
    ]
    return kv, ras.state.active.data_ptr(), ras.active_mask.data_ptr(), ras.drop_count.data_ptr()


def test_the_same_buffers_serve_every_step_and_run():
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=1, error_reset_steps=(3,))
    seen = []
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        for _ in range(2):  # two runs
            ctx = start(ras, x)
            for s in range(6):
                step(ras, ctx, model, s, x, y)
                if ras.records[-1]["ras"]:
                    seen.append(_pointers(ras))
    assert len(seen) == 2 * 4 and len(seen[0][0]) == len(model.blocks)
    assert all(p == seen[0] for p in seen)
    # a dense step between RAS steps refills the caches in place: same memory, new values
    ras.release()
    assert not ras.state.kv and not ras._buffers


def test_with_an_accelerator_that_changes_the_batch_the_slots_are_kept():
    from adaptdiff.accel.guidance.adaptive import AdaptiveGuidance

    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=1)
    x, ag = torch.randn(1, 4, 8, 8), AdaptiveGuidance(threshold=0.9)
    start(ras, x, guidance=2.0)
    assert ras.state.plain_batch
    start(ras, x, accelerators=[ras, ag])  # no guidance: adaptive guidance is neutral
    assert ras.state.plain_batch
    start(ras, x, accelerators=[ras, ag], guidance=2.0)
    assert not ras.state.plain_batch


@pytest.mark.slow
def test_a_ras_step_compiles_with_fullgraph():
    """The model call of a RAS step and the selection, each under torch.compile(fullgraph=True):
    no graph break (a break raises), and the same result as eager."""
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=1)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    ctx = start(ras, x)
    with torch.no_grad():
        first = step(ras, ctx, model, 0, x, y)
        torch._dynamo.reset()
        # aot_eager: dynamo's graph capture (where a break would raise) and the fake kernels,
        # without inductor's code generation (minutes on a small machine)
        select = torch.compile(ras._select, fullgraph=True, backend="aot_eager")
        drop = ras.drop_count.clone()
        active = select(8)
        ras.drop_count.copy_(drop)
        assert torch.equal(active, ras._select(8))
        s = ModelStep(
            index=1, call=0, t=ctx.timesteps[1], alpha=ctx.timesteps[1], sigma=ctx.timesteps[1],
            x=first, ctx=ctx, branches=["cond"], guidance_scale=1.0, history=deque(),
        )  # fmt: skip
        ras.before_model(s)
        assert ras.state.mode == "ras"
        s.batch_slots = torch.arange(2)
        t = ctx.timesteps[1].expand(2)
        eager = model(first, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(first, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_step_graph_wrapper_runs_eagerly_without_capture_and_refuses_the_cpu():
    model = random_dit()
    ras = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    with torch.no_grad():
        want = run(model, [ras])
        wrapped = RASStepGraph(model, ras, capture=False)
        assert torch.equal(run(wrapped, [ras]), want)
        assert wrapped.captures == wrapped.replays == 0
        with pytest.raises(RuntimeError, match="RASStepGraph: capture=True .* needs CUDA"):
            run(RASStepGraph(model, ras), [ras])
    with pytest.raises(TypeError, match="RASStepGraph: ras must be a RAS"):
        RASStepGraph(model, object())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_a_ras_step_does_not_synchronise_on_cuda():
    model = random_dit().cuda()
    ras = RAS(model, sample_ratio=0.5, start_step=1)
    x, y = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([1, 2], device="cuda")
    ctx = start(ras, x)
    with torch.no_grad():
        step(ras, ctx, model, 0, x, y)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in (1, 2, 3):
                x = step(ras, ctx, model, s, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [r["ras"] for r in ras.records] == [False, True, True, True]


@cuda
def test_ras_steps_replayed_from_cuda_graphs_match_eager():
    model = random_dit().cuda()
    y = torch.arange(2, device="cuda")
    kw = dict(method="euler", steps=8, prediction="flow", cond={"y": y}, progress=False,
              uncond={"y": torch.full_like(y, 10)}, guidance_scale=2.0)  # fmt: skip
    ras = RAS(model, sample_ratio=0.5, start_step=2, error_reset_steps=(5,))
    with torch.no_grad():
        want = sample(model, (2, 4, 8, 8), accelerators=[ras], device="cuda",
                      generator=torch.Generator("cuda").manual_seed(0), **kw)  # fmt: skip
        graphed = RASStepGraph(model, ras)
        for _ in range(2):  # the second run replays the graph of the first
            out = sample(graphed, (2, 4, 8, 8), accelerators=[ras], device="cuda",
                         generator=torch.Generator("cuda").manual_seed(0), **kw)  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert graphed.captures == 1 and graphed.replays == 2 * 5 - 1
