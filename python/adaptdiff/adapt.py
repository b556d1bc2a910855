"""Deprecated: the adapt experiment is the study :mod:`adaptdiff.studies.adapt`
(``adaptdiff study adapt``); this name stays importable and is that module."""

import sys
import warnings

from .studies import adapt as _adapt

warnings.warn("adaptdiff.adapt moved to adaptdiff.studies.adapt", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _adapt
