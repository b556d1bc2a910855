"""scikit-learn's handwritten digits as a tiny image data set that needs no download.

1,797 grey-scale 8×8 images (values 0..16) of the ten digits ship inside scikit-learn
(``sklearn.datasets.load_digits``). :func:`digits` scales them to [-1, 1] and resizes them with
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``: upsampling (16, 32) is
plain bilinear interpolation (antialias only acts when shrinking), so every value stays a convex
combination of the 8×8 pixels and inside [-1, 1].

The split is stratified and balanced: per class, a seeded permutation (NumPy's legacy
``RandomState``, whose stream is frozen across versions) puts 30 images in ``"test"`` and the rest
(1,497 images in all) in ``"train"``. The digits metrics (:mod:`adaptdiff.metrics.digits`) train
their classifier on ``"train"`` and compare against ``"test"`` with the default ``seed=0``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
TEST_PER_CLASS = 30
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is an optional dependency of adaptdiff
        raise ImportError(
            "adaptdiff.data.digits needs scikit-learn: pip install scikit-learn"
        ) from e
    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    labels = bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Sorted indices of ``split``: per class the first ``TEST_PER_CLASS`` of a seeded
    permutation are the test set, the rest the training set."""
    rng = np.random.RandomState(seed)
    test = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        test.append(members[rng.permutation(len(members))[:TEST_PER_CLASS]])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    if split == "test":
        return np.flatnonzero(is_test)
    if split == "train":
        return np.flatnonzero(~is_test)
    return np.arange(len(labels))


def digits(
    size: int = 16,
    split: str = "train",
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(images [N, 1, size, size] float32 in [-1, 1], labels [N] int64)``.

    ``split`` is ``"train"`` (1,497 images), ``"test"`` (300, 30 per class) or ``"all"`` (1,797);
    ``seed`` picks the split. Images come in the data set's original order. Deterministic: the
    same arguments give the same tensors on every call.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"digits: size must be a positive int, got {size!r}")
    if split not in SPLITS:
        raise ValueError(f"digits: split must be one of {SPLITS}, got {split!r}")
    raw_images, raw_labels = _load_raw()
    index = split_indices(raw_labels, split, seed)
    images = torch.from_numpy(raw_images[index]).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0)
    labels = torch.from_numpy(raw_labels[index].copy())
    return images.to(device), labels.to(device)


def batches(
    *tensors: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of mini-batches over tensors that share their first dimension.

    ``generator`` (a CPU generator) makes the shuffle reproducible; ``drop_last`` skips a last,
    smaller batch. Yields tuples of slices on the tensors' device.
    """
    if not tensors:
        raise ValueError("batches: give at least one tensor")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        sizes = [t.shape[0] for t in tensors]
        raise ValueError(f"batches: tensors must share their first dimension, got {sizes}")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(tensors[0].device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield tuple(t[index] for t in tensors)
