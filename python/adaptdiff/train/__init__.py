"""Training: denoising objectives (and, beside them, the trainer)."""

from .objectives import DiffusionObjective

__all__ = ["DiffusionObjective"]
