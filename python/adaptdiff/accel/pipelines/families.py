"""The per-family adapter table: how each diffusers pipeline calls its denoiser.

A :class:`PipelineFamily` says, for one or more pipeline classes (matched by class name along
the pipeline's class hierarchy, so diffusers need not be imported here):

- ``denoiser``: the pipeline attribute holding the transformer (``"transformer"``);
- ``layout``: how the classifier-free-guidance branches reach the transformer:
  ``"cond_first"`` (one call on ``cat([cond, uncond])``: DiT), ``"uncond_first"`` (one call on
  ``cat([uncond, cond])`` then ``chunk(2)``: PixArt, SD3, Sana) or ``"separate"`` (one call per
  branch inside ``transformer.cache_context("cond" / "uncond")``: Flux's true CFG);
- ``row_args``: the transformer arguments that carry one row per batch row (sliced when a
  method drops rows of the batch); every other argument is passed unchanged;
- ``prediction``: what the transformer predicts, ``"eps"`` (alpha/sigma from the scheduler's
  ``alphas_cumprod`` at the timestep) or ``"flow"`` (sigma = t / num_train_timesteps, alpha = 1 -
  sigma: FlowMatch and flow-sigma DPM-Solver schedulers);
- ``guidance(args) -> float | None``: the guidance scale of one ``pipe(...)`` call from its bound
  arguments (defaults applied), None when that call runs no classifier-free guidance;
- ``image_tokens``: ``"all"`` (the transformer's sequence is the image: DiT, PixArt, Sana) or
  ``"image_only"`` (joint attention with text tokens, only the image tokens are per-patch:
  SD3, Flux), for token methods;
- ``refuse(args)``: a reason to refuse a call whose options make extra transformer calls the
  table does not describe (SD3's skip-layer guidance), or None.

:func:`register_pipeline_family` adds a family (or replaces one of the same name) without
editing adaptdiff; :func:`family_of` finds the family of a pipeline or raises one error naming
what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "FAMILIES",
    "NOT_IN_PIPELINES",
    "PipelineFamily",
    "family_of",
    "register_pipeline_family",
]

LAYOUTS = ("cond_first", "uncond_first", "separate")
PREDICTIONS = ("eps", "flow")
TOKEN_LAYOUTS = ("all", "image_only")


def _scale_above_one(name: str) -> Callable[[dict], float | None]:
    def guidance(args: dict) -> float | None:
        w = args.get(name)
        return float(w) if w is not None and w > 1 else None

    return guidance


def _flux_guidance(args: dict) -> float | None:
    w = args.get("true_cfg_scale")
    has_negative = args.get("negative_prompt") is not None or (
        args.get("negative_prompt_embeds") is not None
        and args.get("negative_pooled_prompt_embeds") is not None
    )
    return float(w) if w is not None and w > 1 and has_negative else None


def _sd3_refuse(args: dict) -> str | None:
    if args.get("skip_guidance_layers") is not None:
        return "skip_guidance_layers (skip-layer guidance makes a third transformer call per step)"
    return None


@dataclass
class PipelineFamily:
    """How one family of diffusers pipelines calls its denoiser (see the module docstring)."""

    name: str
    pipelines: tuple[str, ...]
    layout: str
    prediction: str
    guidance: Callable[[dict], float | None]
    row_args: tuple[str, ...] = ("hidden_states", "timestep", "encoder_hidden_states")
    denoiser: str = "transformer"
    image_tokens: str = "all"
    refuse: Callable[[dict], str | None] = field(default=lambda args: None)

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"PipelineFamily: name must be a non-empty string, got {self.name!r}")
        if isinstance(self.pipelines, str):
            self.pipelines = (self.pipelines,)
        self.pipelines = tuple(p if isinstance(p, str) else p.__name__ for p in self.pipelines)
        if not self.pipelines:
            raise ValueError("PipelineFamily: pipelines must name at least one pipeline class")
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"PipelineFamily: layout must be one of {LAYOUTS}, got {self.layout!r}"
            )
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"PipelineFamily: prediction must be one of {PREDICTIONS}, got {self.prediction!r}"
            )
        if self.image_tokens not in TOKEN_LAYOUTS:
            raise ValueError(
                f"PipelineFamily: image_tokens must be one of {TOKEN_LAYOUTS}, got "
                f"{self.image_tokens!r}"
            )
        if not callable(self.guidance):
            raise ValueError("PipelineFamily: guidance must be a function of the call arguments")
        self.row_args = tuple(self.row_args)
        if "hidden_states" not in self.row_args:
            raise ValueError("PipelineFamily: row_args must include 'hidden_states'")

    def alpha_sigma(self, scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) of x_t = alpha x0 + sigma eps at the scheduler's timestep ``t``."""
        t = float(t)
        if self.prediction == "flow":
            n = scheduler.config.get("num_train_timesteps", 1000)
            sigma = t / n
            return torch.tensor(1.0 - sigma), torch.tensor(sigma)
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(
                f"adaptdiff.accel: {type(scheduler).__name__} has no alphas_cumprod; family "
                f"{self.name!r} (prediction 'eps') needs it"
            )
        i = min(max(int(round(t)), 0), len(ac) - 1)
        a = float(ac[i])
        return torch.tensor(math.sqrt(a)), torch.tensor(math.sqrt(1.0 - a))


FAMILIES: dict[str, PipelineFamily] = {}

# Configs that do not run inside a pipeline yet (``accel.apply(pipe, ...)`` refuses them).
NOT_IN_PIPELINES: dict[str, str] = {}


def register_pipeline_family(family: PipelineFamily) -> PipelineFamily:
    """Make ``accel.apply(pipe, ...)`` drive the pipelines ``family.pipelines`` names (replacing
    a family of the same name). Returns the family."""
    if not isinstance(family, PipelineFamily):
        raise ValueError(
            f"register_pipeline_family: family must be a PipelineFamily, got "
            f"{type(family).__name__}"
        )
    FAMILIES[family.name] = family
    return family


def family_of(pipe) -> PipelineFamily:
    """The registered family of ``pipe`` (its class or the nearest base class named in a family),
    else one ValueError naming the pipeline and what a new family must describe."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipelines:
                return family
    known = sorted(p for f in FAMILIES.values() for p in f.pipelines)
    raise ValueError(
        f"accel.apply: {type(pipe).__name__} is not a known pipeline family (known: {known}); "
        "describe it with adaptdiff.accel.register_pipeline_family(PipelineFamily(name=..., "
        "pipelines=(...), layout='cond_first'|'uncond_first'|'separate', prediction='eps'|"
        "'flow', guidance=<call arguments -> scale or None>, row_args=(...)))"
    )


for _family in (
    PipelineFamily(
        "dit", ("DiTPipeline",), "cond_first", "eps", _scale_above_one("guidance_scale"),
        row_args=("hidden_states", "timestep", "class_labels"),
    ),
    PipelineFamily(
        "pixart", ("PixArtSigmaPipeline", "PixArtAlphaPipeline"), "uncond_first", "eps",
        _scale_above_one("guidance_scale"),
        row_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
    ),
    PipelineFamily(
        "sd3", ("StableDiffusion3Pipeline",), "uncond_first", "flow",
        _scale_above_one("guidance_scale"),
        row_args=("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
        image_tokens="image_only", refuse=_sd3_refuse,
    ),
    PipelineFamily(
        "flux", ("FluxPipeline",), "separate", "flow", _flux_guidance,
        row_args=("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                  "guidance"),
        image_tokens="image_only",
    ),
    PipelineFamily(
        "sana", ("SanaPipeline",), "uncond_first", "flow", _scale_above_one("guidance_scale"),
        row_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
    ),
):  # fmt: skip
    register_pipeline_family(_family)
