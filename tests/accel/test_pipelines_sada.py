"""Per-sample step skipping inside diffusers pipelines with several prompts per call: the rows a
skipper answers leave the transformer's batch, and each prompt of the batch is denoised as it
would be alone."""

import pytest
import torch

from adaptdiff import accel
from adaptdiff.accel.pipelines import driving
from adaptdiff.samplers import Accelerator

diffusers = pytest.importorskip("diffusers")

from adaptdiff.bench.pipelines import build_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT_SHAPES = {"flux": (16, 16)}  # Flux's packed latents [B, tokens, channels]; else [B,4,8,8]


def _setup(family: str, steps: int, seed: int = 3):
    pipe, kw = build_pipeline(family, batch=2, seed=seed)
    kw["num_inference_steps"] = steps
    shape = (2, *LATENT_SHAPES.get(family, (4, 8, 8)))
    kw["latents"] = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    return pipe, kw


def _alone(kw: dict, b: int) -> dict:
    """The call arguments of prompt ``b`` alone (its embeddings, masks and latents)."""
    return {k: v[b : b + 1] if isinstance(v, torch.Tensor) and v.shape[0] == 2 else v
            for k, v in kw.items()}  # fmt: skip


def _run(pipe, kw):
    return pipe(**kw, generator=torch.Generator().manual_seed(0)).images


class _Sizes:
    """The batch of every transformer call."""

    def __init__(self, module):
        self.module, self.sizes = module, []
        inner = module.forward

        def forward(*args, **kwargs):
            self.sizes.append((args[0] if args else kwargs["hidden_states"]).shape[0])
            return inner(*args, **kwargs)

        module.forward = forward

    def close(self):
        del self.module.__dict__["forward"]


class _SkipRows(Accelerator):
    """Answers sample ``b`` at the steps ``skips[b]`` with its previous prediction (the others'
    rows computed): per-sample step skipping with a fixed schedule."""

    def __init__(self, skips: dict[int, set[int]]):
        self.skips = skips

    def before_model(self, step):
        skip = [b for b in range(step.x.shape[0]) if step.index in self.skips.get(b, ())]
        if not skip:
            return None
        pred = step.history[-1].pred
        if len(skip) == step.x.shape[0]:
            return pred
        step.rows = torch.tensor([b for b in range(step.x.shape[0]) if b not in skip])
        step.row_preds = pred
        return None


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux", "sana"])
def test_skipped_rows_leave_the_batch_and_each_prompt_is_as_alone(family):
    steps = 6
    pipe, kw = _setup(family, steps)
    skips = {0: {2, 3}, 1: {3, 4}}  # step 3: both samples, no transformer call
    sizes = _Sizes(pipe.transformer)
    try:
        with driving(pipe, [_SkipRows(skips)]) as owner:
            both = _run(pipe, kw)
            call = owner.calls[-1]
        batch_sizes = list(sizes.sizes)
        alone = []
        for b in range(2):  # each prompt alone, with its own schedule
            with driving(pipe, [_SkipRows({0: skips[b]})]):
                alone.append(_run(pipe, _alone(kw, b)))
    finally:
        sizes.close()
    per_step = [2, 2, 1, 0, 1, 2]  # rows computed per branch: 1 at steps 2 and 4, 0 at step 3
    if family == "flux":  # a cond and an uncond call per computed step
        want = [n for n in per_step if n for _ in range(2)]
    else:  # one call on both branches
        want = [2 * n for n in per_step if n]
    assert batch_sizes == want
    assert call["skipped_steps"] == [3] and call["skipped_rows"] == 2
    assert call["rows"] == sum(want) and call["rows_plain"] == 2 * 2 * steps
    assert call["uncond_rows_dropped"] == 0  # the skipped rows are not counted there
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_dit_skipped_rows_get_the_skippers_prediction():
    """DiT (cond-first batch, learned-sigma channels): the scheduler gets the skipper's
    prediction at the skipped row, the transformer the other row only."""
    steps = 5
    pipe, kw = build_pipeline("dit", batch=2)
    kw["num_inference_steps"] = steps
    seen = []
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):
        seen.append(model_output)
        return original(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    sizes = _Sizes(pipe.transformer)
    skipper = _SkipRows({0: {2}, 1: {3}})
    given = {}
    before = skipper.before_model

    def record(s):
        out = before(s)
        if s.row_preds is not None:
            given[s.index] = s.row_preds
        return out

    skipper.before_model = record
    try:
        with driving(pipe, [skipper]):
            _run(pipe, kw)
    finally:
        sizes.close()
        del pipe.scheduler.step
    assert sizes.sizes == [4, 4, 2, 2, 4]  # cat([cond, uncond]) of the rows that compute
    for i, row in ((2, 0), (3, 1)):
        # both halves (cond, uncond) of the scheduler's input hold the skipper's prediction
        for half in (0, 2):
            assert torch.equal(seen[i][half + row], given[i][row].to(seen[i].dtype))


def test_per_sample_sada_in_a_batch_denoises_each_prompt_as_alone():
    """SADA's own per-sample rule inside SD3's pipeline with two prompts: the two trajectories
    skip different steps, and each comes out as that prompt alone does."""
    pipe, kw = _setup("sd3", steps=16)
    plain_both = _run(pipe, kw)
    plain_alone = torch.cat([_run(pipe, _alone(kw, b)) for b in range(2)])
    if not torch.equal(plain_both, plain_alone):
        # SADA's criterion after an extrapolated step is a sign test of rounding noise: batch
        # and alone runs can only be compared where the transformer is batch-invariant
        pytest.skip("this machine's SD3 transformer is not bitwise batch-invariant")
    cfg = accel.SADAConfig(start=0.0, end=1.0, lagrange_from=None)  # per_sample=True
    sizes = _Sizes(pipe.transformer)
    accel.apply(pipe, cfg)
    try:
        both = _run(pipe, kw)
        call = accel.summary(pipe)["calls"][-1]
        per_sample = call["contexts"]["default"]["sada"]["skipped_per_sample"]
        batch_sizes = list(sizes.sizes)
        alone, alone_skips = [], []
        for b in range(2):
            alone.append(_run(pipe, _alone(kw, b)))
            sada = accel.summary(pipe)["calls"][-1]["contexts"]["default"]["sada"]
            alone_skips += sada["skipped_per_sample"]
    finally:
        accel.remove(pipe)
        sizes.close()
    assert per_sample[0] != per_sample[1], "both prompts skipped alike: the test says nothing"
    assert per_sample == alone_skips
    computing = [sum(i not in s for s in per_sample) for i in range(16)]
    assert batch_sizes == [2 * n for n in computing if n]
    assert call["skipped_rows"] == sum(1 for n in computing if n == 1)  # one of the two skipped
    assert torch.equal(both, torch.cat(alone))
