"""Quality metrics that need no download: PSNR and SSIM between two sets of images, and the
digits classifier's class-conditional accuracy and Fréchet distance (digits-FD)."""

from .digits import ClassifierConfig, DigitsClassifier, DigitsEvaluator, frechet_distance
from .edges import edge_scores
from .image import psnr, ssim

__all__ = [
    "ClassifierConfig",
    "DigitsClassifier",
    "DigitsEvaluator",
    "edge_scores",
    "frechet_distance",
    "psnr",
    "ssim",
]
