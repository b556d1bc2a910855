"""Embedded data sets that need no download: scikit-learn's digits (images) and the Python
standard library's pydoc topics (text)."""

from .digits import batches, digits
from .moving_digits import MOTIONS, moving_digits
from .text import CharTokenizer, pydoc_corpus, text_windows

__all__ = [
    "MOTIONS",
    "CharTokenizer",
    "batches",
    "digits",
    "moving_digits",
    "pydoc_corpus",
    "text_windows",
]
