"""Cheaper classifier-free guidance: Adaptive Guidance and LinearAG (:mod:`.adaptive`)."""

from .adaptive import *  # noqa: F403  (``adaptdiff.accel.guidance`` was this module)
from .adaptive import __all__  # noqa: F401
