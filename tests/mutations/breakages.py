"""Named breakages of core mechanisms, each a small in-memory patch, and the test files that
must notice it (docs/reliability.md, "Mutation checks").

:mod:`tests.mutations.plugin` applies one breakage (``ADAPTDIFF_MUTATION=<name>``) in a pytest
child process before any test module is imported; nothing on disk changes.
:mod:`tests.mutations.test_mutations` runs each entry's files under its breakage and expects a
failure, with the first failing test equal to the entry's ``caught_by``.

To add an entry: write a ``_<name>()`` function that patches the mechanism (``_replace`` for a
module-level function, ``_wrap`` for a method), add a :class:`Breakage` row naming the smallest
test files that should catch it, run ``python -m pytest -q tests/mutations -k <name>`` to learn
the first failing test, put it in ``caught_by``, then regenerate the docs table with
``python -m tests.mutations.breakages --markdown``. An entry that no test catches yet is
``pending`` (its harness case is a strict xfail) until the catching tests land.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV = "ADAPTDIFF_MUTATION"
CONTROL = "none"  # the harness's control run: the plugin loaded, nothing patched


def _replace(module: str, name: str, make: Callable) -> None:
    """Replace the function ``module.name`` by ``make(original)`` there and in every loaded
    ``adaptdiff`` module that imported it by name (``from .x import f``)."""
    old = getattr(importlib.import_module(module), name)
    new = make(old)
    hits = 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("adaptdiff"):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)
                hits += 1
    if not hits:
        raise RuntimeError(f"mutation: {module}.{name} was not found to replace")


def _wrap(cls: type, name: str, make: Callable) -> None:
    """Replace the method ``cls.name`` by ``make(original)``."""
    old = cls.__dict__.get(name)
    if old is None:
        raise RuntimeError(f"mutation: {cls.__name__}.{name} is not defined on the class")
    setattr(cls, name, make(old))


# ---------------------------------------------------------------- the breakages


def _cache_residual_zeroed() -> None:
    from adaptdiff.accel.caching.online import StackCache

    def make(forecast):
        def zero(self):
            return tuple(None if r is None else torch.zeros_like(r) for r in forecast(self))

        return zero

    _wrap(StackCache, "forecast", make)


def _reused_component_zeroed() -> None:
    from adaptdiff.accel.caching.schedule import ScheduleExecutor
    from adaptdiff.accel.hooks import map_tensors

    def make(cached):
        def zero(self, b, c, batch):
            hit, slots, merge = cached(self, b, c, batch)
            if hit is not None:
                hit = map_tensors(hit, torch.zeros_like)
            return hit, slots, merge

        return zero

    _wrap(ScheduleExecutor, "_cached", make)


def _sada_reuse() -> None:
    from adaptdiff.accel.steps.sada import SADA
    from adaptdiff.samplers.parameterization import target

    def make(_skip):
        def reuse(self, step, approx, skip):
            last = self.records[-1]  # f = eps - x0
            eps = last.f + last.x0
            return target(last.x0, eps, step.alpha, step.sigma, step.ctx.prediction)

        return reuse

    _wrap(SADA, "_skip", make)


def _ras_reuse() -> None:
    from adaptdiff.accel.tokens.ras import RAS

    def make(after_model):
        def reuse(self, step, pred):
            if self.ras_run and step.evaluated and self.state.mode == "ras":
                pred = self.last_pred  # every token keeps its previous prediction
            return after_model(self, step, pred)

        return reuse

    _wrap(RAS, "after_model", make)


def _linear_ag_scale_ignored() -> None:
    from adaptdiff.accel.guidance.adaptive import LinearAG

    def make(after_model):
        def unscaled(self, step, pred):
            return after_model(self, dataclasses.replace(step, guidance_scale=1.0), pred)

        return unscaled

    _wrap(LinearAG, "after_model", make)


def _cfg_scale_ignored() -> None:
    from adaptdiff.samplers.accelerator import ModelStep

    def make(init):
        def unscaled(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.guidance_scale = 1.0

        return unscaled

    _wrap(ModelStep, "__init__", make)


def _rope_noop() -> None:
    _replace("adaptdiff.models.block_lm", "apply_rope", lambda _: lambda x, cos, sin: x)


def _dtr_unscaled_t() -> None:
    from adaptdiff.models.dit import DiT

    def make(forward):
        def unscaled(self, x, t, *args, **kwargs):
            masks = DiT.dtr_masks
            self.dtr_masks = lambda scaled: masks(self, scaled / self.config.time_scale)
            try:
                return forward(self, x, t, *args, **kwargs)
            finally:
                del self.dtr_masks

        return unscaled

    _wrap(DiT, "forward", make)


def _lora_scale_ignored() -> None:
    from adaptdiff.adapters.lora import LoraLinear

    _wrap(LoraLinear, "scaling", lambda _: lambda self, name: self.weights[name])


def _fera_routing_uniform() -> None:
    from adaptdiff.adapters.fera import FeRALinear

    def make(route):
        def uniform(model, args):
            route(model, args)
            w = model.fera_router.last_weights
            flat = w * 0 + 1 / w.shape[1]  # every sample, every expert: 1/E
            model.fera_router.last_weights = flat
            for layer in model.modules():
                if isinstance(layer, FeRALinear):
                    layer.routing_weights = flat

        return uniform

    _replace("adaptdiff.adapters.fera", "_route_hook", make)


def _sara_values_not_written() -> None:
    from adaptdiff.adapters import sara

    def frozen(layer):  # the base weight's own entries where the values belong
        w = layer.base.weight.detach()
        return w.reshape(-1)[layer.indices] + 0 * layer.values

    def linear(self, x):
        return sara.sara_linear(x, self.base.weight, self.base.bias, self.indices, frozen(self))

    def conv(self, x):
        w = sara._GatherWeightGrad.apply(self.base.weight.detach(), self.indices, frozen(self))
        return self.base._conv_forward(x, w, self.base.bias)

    _wrap(sara.SaraLinear, "forward", lambda _: linear)
    _wrap(sara.SaraConv, "forward", lambda _: conv)


def _moe_unpermute_weights_ignored() -> None:
    def make(unpermute):
        def unweighted(y_sorted, sorted_src, weights, **kwargs):
            return unpermute(y_sorted, sorted_src, torch.ones_like(weights), **kwargs)

        return unweighted

    _replace("adaptdiff.ops", "moe_unpermute", make)


def _block_attention_layout_swapped() -> None:
    swap = {"bd3": "context_causal", "context_causal": "bd3"}

    def make(attention):
        def swapped(q, k, v, block_size, layout, *args, **kwargs):
            return attention(q, k, v, block_size, swap.get(layout, layout), *args, **kwargs)

        return swapped

    _replace("adaptdiff.ops", "block_attention", make)


def _resume_skips_optimizer_state() -> None:
    from adaptdiff.train.trainer import Trainer

    def make(load):
        def fresh_optimizer(self, path):
            load(self, path)
            self.optimizer.state.clear()  # Adam's moments and step counts start over

        return fresh_optimizer

    _wrap(Trainer, "load_checkpoint", make)


def _grad_guidance_sigma_dropped() -> None:
    from adaptdiff.samplers.grad_guidance import GradGuidance

    def make(apply):
        def unscaled(self, x, t, alpha, sigma, x0, eps):
            return apply(self, x, t, alpha, torch.ones_like(sigma), x0, eps)

        return unscaled

    _wrap(GradGuidance, "apply", make)


def _sada_batch_criterion() -> None:
    from adaptdiff.accel.steps.sada import SADA

    def whole_batch(self, m):  # the mean over the batch decides for every sample
        return torch.full((m.shape[0],), float(m.mean()) <= 0)

    _wrap(SADA, "_stable", lambda _: whole_batch)


def _removed_block_still_runs() -> None:
    from adaptdiff.accel.caching.schedule import ScheduleExecutor

    _wrap(ScheduleExecutor, "_removed", lambda _: lambda self, b, c: False)


def _sara_reselect_shrinks_only() -> None:
    from torch import nn

    from adaptdiff.adapters import sara

    def make(reselect):
        def shrink_only(model, optimizer=None, **kwargs):
            old = {id(layer): layer.indices.clone() for _, layer in sara.sara_layers(model)}
            params = reselect(model, optimizer, **kwargs)
            for _, layer in sara.sara_layers(model):
                keep = torch.isin(layer.indices, old[id(layer)])  # nothing new enters
                layer.indices = layer.indices[keep]
                layer.values = nn.Parameter(layer.values.detach()[keep].clone())
            return params

        return shrink_only

    _replace("adaptdiff.adapters.sara", "sara_reselect", make)


def _guidance_policy_keeps_uncond() -> None:
    from adaptdiff.accel.guidance.policy import GuidancePolicy

    _wrap(GuidancePolicy, "before_model", lambda _: lambda self, step: None)


def _selective_scan_skip_ignored() -> None:
    def make(scan):
        def no_skip(u, delta, A, B, C, D_skip=None, *args, **kwargs):
            return scan(u, delta, A, B, C, None, *args, **kwargs)

        return no_skip

    _replace("adaptdiff.ops", "selective_scan", make)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Breakage:
    name: str
    what: str  # the breakage, in words (docs)
    apply: Callable[[], None]
    files: tuple[str, ...]  # run in this order with -x
    caught_by: str | None  # the first test that fails (path::function); None: pending
    slow: bool = False


BREAKAGES = [
    Breakage(
        "cache_residual_zeroed",
        "first-block / TeaCache / MagCache add a zero residual on a skipped step",
        _cache_residual_zeroed,
        ("tests/accel/test_caches.py", "tests/samplers/test_compose.py"),
        "tests/accel/test_caches.py::test_a_skipped_step_adds_the_last_computed_residual_to_the_middle_input",
    ),
    Breakage(
        "reused_component_zeroed",
        "a schedule's reused attention/MLP output is zeros",
        _reused_component_zeroed,
        (
            "tests/accel/test_schedules.py",
            "tests/accel/test_autodiffusion.py",
            "tests/accel/test_hooks.py",
        ),
        "tests/accel/test_schedules.py::test_a_reused_component_returns_the_previous_calls_output",
    ),
    Breakage(
        "sada_reuse",
        "SADA's skipped step reuses the last prediction (no ε / velocity / Lagrange estimate)",
        _sada_reuse,
        ("tests/accel/test_sada.py",),
        "tests/accel/test_sada.py::test_a_skipped_step_gets_its_approximation_formula",
    ),
    Breakage(
        "ras_reuse",
        "RAS keeps every token's previous prediction instead of merging the fresh ones",
        _ras_reuse,
        ("tests/accel/test_ras.py", "tests/accel/test_ras_joint.py"),
        "tests/accel/test_ras.py::test_ras_steps_with_all_tokens_active_match_dense",
    ),
    Breakage(
        "linear_ag_scale_ignored",
        "LinearAG's guided prediction ignores the guidance scale (w = 1)",
        _linear_ag_scale_ignored,
        ("tests/accel/test_guidance.py",),
        "tests/accel/test_guidance.py::test_linear_ag_selecting_the_true_uncond_equals_cfg",
    ),
    Breakage(
        "cfg_scale_ignored",
        "the sampler's classifier-free guidance ignores the guidance scale (w = 1)",
        _cfg_scale_ignored,
        ("tests/samplers/test_sample.py",),
        "tests/samplers/test_sample.py::test_guidance_batches_both_branches_in_one_call",
    ),
    Breakage(
        "rope_noop",
        "`apply_rope` returns its input",
        _rope_noop,
        ("tests/models/test_block_lm.py",),
        "tests/models/test_block_lm.py::test_rope_is_the_closed_form_rotation",
    ),
    Breakage(
        "dtr_unscaled_t",
        "`DiT.forward` builds the DTR masks from t before `time_scale`",
        _dtr_unscaled_t,
        ("tests/models/test_dit.py",),
        "tests/models/test_dit.py::test_dtr_forward_scales_t_before_the_masks",
    ),
    Breakage(
        "lora_scale_ignored",
        "LoRA drops alpha / rank from its scaling",
        _lora_scale_ignored,
        ("tests/adapters/test_lora.py",),
        "tests/adapters/test_lora.py::test_new_adapter_is_identity_and_scaling_is_alpha_over_rank",
    ),
    Breakage(
        "fera_routing_uniform",
        "FeRA's router output replaced by equal expert weights for every input",
        _fera_routing_uniform,
        ("tests/adapters/test_fera.py",),
        "tests/adapters/test_fera.py::test_apply_fera_routes_per_sample_and_gradients_flow",
    ),
    Breakage(
        "sara_values_not_written",
        "SaRA layers run the frozen weight, the trained values not written in",
        _sara_values_not_written,
        ("tests/adapters/test_sara.py",),
        "tests/adapters/test_sara.py::test_forward_unchanged_and_grads_equal_dense_masked_reference",
    ),
    Breakage(
        "moe_unpermute_weights_ignored",
        "`ops.moe_unpermute` sums the expert outputs with weight 1",
        _moe_unpermute_weights_ignored,
        ("tests/ops/test_moe_unpermute.py",),
        "tests/ops/test_moe_unpermute.py::test_matches_reference",
    ),
    Breakage(
        "block_attention_layout_swapped",
        "`ops.block_attention` runs `bd3` as `context_causal` and back",
        _block_attention_layout_swapped,
        ("tests/ops/test_block_attention.py",),
        "tests/ops/test_block_attention.py::test_matches_reference",
    ),
    Breakage(
        "resume_skips_optimizer_state",
        "`Trainer.load_checkpoint` leaves the optimiser's moments fresh",
        _resume_skips_optimizer_state,
        ("tests/train/test_trainer.py",),
        "tests/train/test_trainer.py::test_exact_resume_is_bit_identical",
    ),
    Breakage(
        "grad_guidance_sigma_dropped",
        "gradient guidance adds w g to eps without the factor sigma_t",
        _grad_guidance_sigma_dropped,
        ("tests/samplers/test_grad_guidance.py",),
        "tests/samplers/test_grad_guidance.py::test_exact_classifier_guidance_is_the_conditional_model",
    ),
    Breakage(
        "sada_batch_criterion",
        "SADA's stability test averages over the batch instead of per sample",
        _sada_batch_criterion,
        ("tests/accel/test_sada.py",),
        "tests/accel/test_sada.py::test_per_sample_batch_equals_each_trajectory_alone",
    ),
    Breakage(
        "removed_block_still_runs",
        'a schedule with `skipped="remove"` (AutoDiffusion\'s default) runs its removed blocks',
        _removed_block_still_runs,
        ("tests/accel/test_autodiffusion.py",),
        "tests/accel/test_autodiffusion.py::test_removed_blocks_return_their_input_and_differ_from_reuse",
    ),
    Breakage(
        "sara_reselect_shrinks_only",
        "`sara_reselect` keeps only entries of the old selection (none can enter)",
        _sara_reselect_shrinks_only,
        ("tests/adapters/test_sara.py",),
        "tests/adapters/test_sara.py::test_reselect_lets_entries_enter_and_leave",
    ),
    Breakage(
        "guidance_policy_keeps_uncond",
        "a guidance policy's `cond`/`linear` steps still run the unconditional branch",
        _guidance_policy_keeps_uncond,
        ("tests/accel/test_guidance_policy.py",),
        "tests/accel/test_guidance_policy.py::test_all_cond_is_conditional_only_bit_for_bit",
    ),
    Breakage(
        "selective_scan_skip_ignored",
        "`ops.selective_scan` drops its `D_skip` term",
        _selective_scan_skip_ignored,
        ("tests/ops/test_selective_scan.py",),
        "tests/ops/test_selective_scan.py::test_matches_reference",
    ),
]

BY_NAME = {b.name: b for b in BREAKAGES}


def apply(name: str) -> None:
    """Apply the breakage ``name`` (``CONTROL``: nothing) in this process."""
    if name == CONTROL:
        return
    if name not in BY_NAME:
        raise ValueError(f"mutation: unknown breakage {name!r}; one of {sorted(BY_NAME)}")
    # load every module a patch may reach before patching
    import adaptdiff.accel  # noqa: F401
    import adaptdiff.adapters  # noqa: F401
    import adaptdiff.models  # noqa: F401
    import adaptdiff.nn  # noqa: F401
    import adaptdiff.samplers  # noqa: F401
    import adaptdiff.train  # noqa: F401

    BY_NAME[name].apply()


def markdown(rows: list[Breakage]) -> str:
    """The table of docs/reliability.md: one line per breakage, with the test that catches it."""
    lines = ["| breakage | what is broken | files run | caught by |", "|---|---|---|---|"]
    for b in rows:
        files = ", ".join(f"`{f.removeprefix('tests/')}`" for f in b.files)
        caught = f"`{b.caught_by.removeprefix('tests/')}`" if b.caught_by else "pending"
        lines.append(f"| `{b.name}` | {b.what} | {files} | {caught} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown(BREAKAGES))
