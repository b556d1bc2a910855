"""Training-free acceleration: one config per method, one way to install them, for adaptdiff's
DiT and diffusers transformers (DiT, PixArt, SD3, Flux). Methods and how they combine:
``docs/accelerators.md``.

Use::

    from adaptdiff import accel
    handle = accel.apply(model, accel.AdaptiveGuidanceConfig(0.99), accel.RASConfig(0.5))
    x = sample(model, shape, ..., accelerators=[handle])  # state reset at every call
    print(accel.summary(model))  # per context: hits, cached steps, what each method did
    accel.remove(model)          # the model computes exactly as before

Configs (every training-free method):

- online caches (:mod:`.caching.online`): ``FirstBlockCacheConfig`` (also Fn/Bn via
  ``first_blocks``/``last_blocks``), ``TeaCacheConfig``, ``MagCacheConfig``,
  ``TaylorSeerConfig``;
- static schedules (:mod:`.caching.schedule`): ``ScheduleConfig(Schedule | path)``, with
  producers in :mod:`.caching.producers` (``interval_schedule``, ``asdm_schedule``,
  ``bac_schedule``) and :mod:`.caching.ecad` (``nsga2``, ``ecad_search``);
- tokens: ``RASConfig`` (region-adaptive sampling, :mod:`.tokens.ras`),
  ``EntropyScalingConfig`` (:mod:`.tokens.entropy_scaling`);
- guidance (:mod:`.guidance.adaptive`): ``AdaptiveGuidanceConfig``, ``LinearAGConfig``
  (coefficients, or the JSON of ``adaptdiff calibrate --method linear-ag``);
  ``GuidancePolicyConfig`` (:mod:`.guidance.policy`: a per-step cfg/cond/linear policy, or the
  JSON of ``adaptdiff calibrate --method guidance-policy``);
- steps: ``SADAConfig`` (:mod:`.steps.sada`).

API (for users and for other acceleration modules):

- ``apply(model, *configs, blocks=None) -> AccelHandle``: install one hook per config, in
  place (``module.forward`` instance attributes through :func:`.hooks.wrap_forward`;
  parameters and ``state_dict`` untouched). ``blocks`` names the block lists if they are not
  ``blocks`` / ``transformer_blocks`` / ``single_transformer_blocks``. Raises if the model is
  already hooked.
- ``remove(model)``, ``reset(model)``, ``summary(model) -> dict``, ``get_handle(model)``.
  Remove the hooks before ``copy.deepcopy`` of a model: a copy's wrappers would call the
  original's modules.
- ``context(model, name)`` (or ``handle.context(name)``): a ``with`` block whose model calls
  use context ``name``'s state (e.g. "cond"/"uncond" when a pipeline calls the branches
  separately). Calls outside any context use ``"default"``. Each context has its own step
  counter (model calls since the reset), caches and hit/miss counters.
- ``AccelHandle`` is an :class:`~adaptdiff.samplers.Accelerator`: ``on_sample_start`` resets
  every context and sets ``handle.num_calls`` (model calls of this generation) so that
  "last steps" rules work; in ``sample`` the step counter is the call's place in the sampler's
  plan (steps SADA skips leave theirs unused). It forwards ``sample``'s calls to the
  sampling-level methods among its configs (AG, LinearAG, SADA, RAS) and reports the
  composition parts of all of them, so ``sample`` checks the combination.
- Extending: subclass :class:`Hook` (``install`` wraps modules with ``handle.wrap(module,
  fn(inner, *args, **kwargs))``; ``self.state`` is this hook's state in the current context;
  ``handle.ctx.count(key, hit)``; ``summary(ctx)``; ``parts(ctx)``) or :class:`SampleHook`
  (``make()`` returns the sampling-level accelerator), and ``register_config(ConfigCls,
  HookCls)``.
- Discovery: ``find_blocks(model)`` (name, module) in execution order; ``find_components(block)``
  the reusable residual-branch submodules (DiT: ``attn``, ``mlp``; diffusers: ``attn1``,
  ``attn2``, ``ff``, ``attn``, ``ff_context``, ``proj_mlp``, ``proj_out``); ``layout(model)``.

Diffusers pipelines (:mod:`.pipelines`): ``apply(pipe, *configs)`` on a ``DiTPipeline``,
``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``SanaPipeline``
installs the hooks on ``pipe.transformer`` and makes every ``pipe(...)`` call one sampling run
(clean state, step count known, AG / LinearAG / SADA inside the pipeline's own loop);
``summary(pipe)`` reports per call, ``summary(pipe, text=True)`` (or ``str(handle)``) in one
line; ``remove(pipe)`` restores it. Other pipelines: ``register_pipeline_family(PipelineFamily(
...))``. ``calibration_setup(pipe, call_kwargs)`` draws ``run_calibration``'s runs through a
pipeline.

The classes behind the configs (``AdaptiveGuidance``, ``LinearAG``, ``SADA``, ``RAS``) can also
be passed to ``sample`` directly.

Calibration (:mod:`.calibration`): ``register_calibrator(name)`` adds ``adaptdiff calibrate
--method name``; ``load_calibration`` validates the JSON (format, version, method, model class /
blocks / parameters). Importing ``adaptdiff.accel`` registers every method: ``teacache`` and
``magcache`` write calibrations, ``bac`` and ``ecad`` (:mod:`.caching.searches`) and
``autodiffusion`` (:mod:`.steps.autodiffusion`) schedules, ``linear-ag`` LinearAG coefficients.
"""

import importlib as _importlib
import sys as _sys

from .api import apply, context, get_handle, register_config, remove, reset, summary
from .caching.online import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerConfig, TeaCacheConfig
from .caching.schedule import Schedule, ScheduleConfig
from .caching.searches import calibrate_bac, calibrate_ecad  # noqa: F401  (registers bac, ecad)
from .calibration import (
    CALIBRATORS,
    CalibrationSetup,
    load_calibration,
    register_calibrator,
    run_calibration,
)
from .guidance.adaptive import AdaptiveGuidanceConfig, LinearAGConfig  # registers linear-ag
from .guidance.policy import GuidancePolicyConfig  # registers guidance-policy
from .hooks import AccelHandle, ContextState, Hook, SampleHook, find_blocks, find_components, layout
from .pipelines import PipelineFamily, PipelineHandle, calibration_setup, register_pipeline_family
from .steps import autodiffusion as _autodiffusion  # noqa: F401  (registers autodiffusion)
from .steps.sada import SADAConfig
from .tokens.entropy_scaling import EntropyScalingConfig
from .tokens.ras import RASConfig

# Module paths before the family grouping, kept importable (``adaptdiff.accel.ras`` and so on).
_OLD_PATHS = {
    "caches": "caching.online",
    "schedule": "caching.schedule",
    "producers": "caching.producers",
    "ecad": "caching.ecad",
    "searches": "caching.searches",
    "ras": "tokens.ras",
    "ras_joint": "tokens.ras_joint",
    "entropy_scaling": "tokens.entropy_scaling",
    "sada": "steps.sada",
    "autodiffusion": "steps.autodiffusion",
}
for _old, _new in _OLD_PATHS.items():
    _sys.modules[f"{__name__}.{_old}"] = _importlib.import_module(f".{_new}", __name__)

__all__ = [
    "CALIBRATORS",
    "AccelHandle",
    "AdaptiveGuidanceConfig",
    "CalibrationSetup",
    "ContextState",
    "EntropyScalingConfig",
    "FirstBlockCacheConfig",
    "GuidancePolicyConfig",
    "Hook",
    "LinearAGConfig",
    "MagCacheConfig",
    "PipelineFamily",
    "PipelineHandle",
    "RASConfig",
    "SADAConfig",
    "SampleHook",
    "Schedule",
    "ScheduleConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "apply",
    "calibration_setup",
    "context",
    "find_blocks",
    "find_components",
    "get_handle",
    "layout",
    "load_calibration",
    "register_calibrator",
    "register_config",
    "register_pipeline_family",
    "remove",
    "reset",
    "run_calibration",
    "summary",
]
