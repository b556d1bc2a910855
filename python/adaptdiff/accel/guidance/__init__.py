"""Cheaper classifier-free guidance: Adaptive Guidance and LinearAG (:mod:`.adaptive`), static
per-step guidance policies and their search (:mod:`.policy`)."""

from . import policy as policy  # registers GuidancePolicyConfig and guidance-policy
from .adaptive import *  # noqa: F403  (``adaptdiff.accel.guidance`` was this module)
from .adaptive import __all__  # noqa: F401
