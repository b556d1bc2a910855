"""``adaptdiff bench accel``: training-free accelerators, quality against speed (:mod:`.main`).

Modules: :mod:`.methods` (the methods compared), :mod:`.digits`, :mod:`.dit_b` and
:mod:`.diffusers_dit` (one per model, each with its runner), :mod:`.comparison` (PSNR at equal
speedup against diffusers' own caches) and :mod:`.report` (table, plot, JSON lines).
"""

from .main import MODELS, build_parser, main

__all__ = ["MODELS", "build_parser", "main"]
