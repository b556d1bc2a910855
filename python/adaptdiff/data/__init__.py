"""Embedded data sets that need no download: scikit-learn's digits (images) and the Python
standard library's pydoc topics (text)."""

from . import reach_push
from .digits import batches, digits
from .reach_push import ReachPush
from .text import CharTokenizer, pydoc_corpus, text_windows

__all__ = [
    "CharTokenizer",
    "ReachPush",
    "batches",
    "digits",
    "pydoc_corpus",
    "reach_push",
    "text_windows",
]
