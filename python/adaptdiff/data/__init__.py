"""Data that need no download, embedded or generated in code: scikit-learn's digits (images)
and the Python standard library's pydoc topics (text), and what is built from them: conditions
of digit images (edges, blur, ...), moving digits, questions about digits, verifiable text
tasks with exact-match rewards, word-level sequence-to-sequence tasks, a 2-D reach-and-push
task with a scripted expert, synthetic multivariate time series, and patches of the two
photographs scikit-learn ships (real high frequencies, which the upsampled digits lack)."""

from . import conditions, digit_qa, reach_push, rl_tasks, seq2seq, timeseries
from .captions import digit_captions
from .digits import batches, digits
from .edge_scenes import edge_scenes
from .inpainting import InpaintingData
from .moving_digits import MOTIONS, moving_digits
from .photos import photo_patches
from .pyramid import laplacian_pyramid, reconstruct
from .reach_push import ReachPush
from .text import CharTokenizer, pydoc_corpus, text_windows

__all__ = [
    "MOTIONS",
    "CharTokenizer",
    "InpaintingData",
    "ReachPush",
    "batches",
    "conditions",
    "digit_captions",
    "digit_qa",
    "digits",
    "laplacian_pyramid",
    "edge_scenes",
    "moving_digits",
    "photo_patches",
    "pydoc_corpus",
    "reach_push",
    "reconstruct",
    "rl_tasks",
    "seq2seq",
    "text_windows",
    "timeseries",
]
