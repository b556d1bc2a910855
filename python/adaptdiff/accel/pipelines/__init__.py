"""Training-free acceleration of diffusers pipelines: ``accel.apply(pipe, *configs)``.

:mod:`.families`: the per-family adapter table (:class:`PipelineFamily`, how each pipeline class
calls its denoiser) and :func:`register_pipeline_family`. :mod:`.driver`: the
:class:`PipelineHandle` that turns every ``pipe(...)`` call into one adaptdiff sampling run
(clean state per call, the methods' ``before_model`` / ``after_model`` around each transformer
call, a per-call summary). :func:`calibration_setup` lets ``run_calibration`` draw its runs
through a pipeline. Use and limits: ``docs/accelerators.md``, section "diffusers pipelines".
"""

from .calibrate import calibration_setup
from .driver import PipelineHandle, driving, is_pipeline
from .families import (
    FAMILIES,
    NOT_IN_PIPELINES,
    PipelineFamily,
    family_of,
    register_pipeline_family,
)

__all__ = [
    "FAMILIES",
    "NOT_IN_PIPELINES",
    "PipelineFamily",
    "PipelineHandle",
    "calibration_setup",
    "driving",
    "family_of",
    "is_pipeline",
    "register_pipeline_family",
]
