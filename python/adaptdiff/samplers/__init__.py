"""Schedules, parameterisations and samplers behind one call, :func:`sample`.

- :mod:`.schedules`: :class:`VPSchedule` (DDPM) and :class:`FlowSchedule` (rectified flow).
- :mod:`.parameterization`: eps / v / x0 / flow predictions to (x0, eps) and back.
- :mod:`.solvers`: k-diffusion-style sampler functions, one signature (``SAMPLERS``).
- :mod:`.accelerator`: the hook protocol accelerators implement.
- :mod:`.sample`: the entry point, with classifier-free guidance.
- :mod:`.grad_guidance`: classifier and predictor guidance (``sample(grad_guidance=...)``).
- :mod:`.block_decode`: block decoding of diffusion LMs with an exact KV cache, and AR decoding.
"""

from .accelerator import Accelerator, ModelStep, Part, Prediction, SampleContext
from .block_decode import DecodeOutput, TraceStep, ar_decode, block_decode
from .grad_guidance import GradGuidance, classifier_guidance, predictor_guidance
from .parameterization import PREDICTIONS, convert, eps_to_x0, target, to_x0_eps, x0_to_eps
from .progressive import dfm_plan, sample_dfm, steps_for_nfe
from .sample import denoiser, sample
from .schedules import FlowSchedule, VPSchedule
from .solvers import (
    SAMPLERS,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "Accelerator",
    "DecodeOutput",
    "FlowSchedule",
    "GradGuidance",
    "ModelStep",
    "Part",
    "Prediction",
    "SampleContext",
    "TraceStep",
    "VPSchedule",
    "ar_decode",
    "block_decode",
    "classifier_guidance",
    "convert",
    "denoiser",
    "dfm_plan",
    "eps_to_x0",
    "predictor_guidance",
    "sample",
    "sample_dfm",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "steps_for_nfe",
    "target",
    "to_x0_eps",
    "x0_to_eps",
]
