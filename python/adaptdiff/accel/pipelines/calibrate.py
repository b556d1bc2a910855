"""Calibration runs drawn through a diffusers pipeline (``run_calibration`` on a pipeline)."""

from __future__ import annotations

import torch

from ..calibration import CalibrationSetup
from .driver import driving
from .families import family_of

__all__ = ["calibration_setup"]


def calibration_setup(pipe, call_kwargs: dict, *, runs: int = 2, seed: int = 0, options=None):
    """A :class:`~adaptdiff.accel.CalibrationSetup` whose run ``r`` is
    ``pipe(**call_kwargs, generator=torch.Generator().manual_seed(seed + r))`` with the
    calibrator's accelerators driven inside it (the pipeline must have no hooks: calibrate the
    exact model). Pass it to ``accel.run_calibration(method, setup, out)``: every registered
    method runs (teacache, magcache, linear-ag, bac, ecad; ``options`` as ``--option``).
    ``call_kwargs`` must make the pipeline return tensors or arrays (``output_type`` "latent",
    "pt" or "np"), which ``ecad`` compares.
    """
    family = family_of(pipe)
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"calibration_setup: runs must be an int >= 1, got {runs!r}")
    if "generator" in call_kwargs:
        raise ValueError(
            "calibration_setup: call_kwargs must not hold a generator (seed drives it)"
        )
    transformer = getattr(pipe, family.denoiser)

    def sample(run: int, accelerators):
        with driving(pipe, accelerators, family):
            out = pipe(**call_kwargs, generator=torch.Generator().manual_seed(seed + run))
        images = out.images if hasattr(out, "images") else out[0]
        if isinstance(images, list):
            raise ValueError(
                "calibration_setup: the pipeline returned a list (PIL images); pass "
                'output_type="latent", "pt" or "np" in call_kwargs'
            )
        return torch.as_tensor(images)

    steps = call_kwargs.get("num_inference_steps")
    sampling = {"pipeline": type(pipe).__name__, "steps": steps, "runs": runs, "seed": seed}
    return CalibrationSetup(transformer, sample, runs, sampling, dict(options or {}))
