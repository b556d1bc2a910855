"""Patches of real photographs with real high frequencies, shipped inside scikit-learn.

The embedded digits are 8×8 images upsampled, so nothing in them is finer than 8×8: a
super-resolution target, an edge map or a pyramid's fine band made from them is an interpolation
of a coarser image. scikit-learn bundles two 427×640 colour photographs
(``sklearn.datasets.load_sample_images``: a temple in China and a flower); :func:`photo_patches`
cuts grey-scale patches from them.

The split is spatial, so no test pixel is ever seen in training: the left 75 % of each photograph
(columns ``[0, 480)``) gives ``"train"`` patches, the right 25 % (``[480, 640)``) ``"test"``
patches. Patches are drawn at seeded random positions (and, with ``scales``, from the photograph
shrunk first by each factor with antialiasing, which brings more structure into a small patch).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
_TRAIN_COLUMNS = 480  # of 640


@functools.lru_cache(maxsize=1)
def _load_grey() -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # scikit-learn (and pillow, to read the JPEGs) are optional
        raise ImportError(
            "adaptdiff.data.photos needs scikit-learn and pillow: pip install scikit-learn pillow"
        ) from e
    images = load_sample_images().images  # two uint8 [427, 640, 3]
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma
    return tuple(torch.from_numpy(image.astype(np.float32) @ weights / 255.0) for image in images)


def photo_patches(
    n: int,
    size: int = 32,
    split: str = "train",
    *,
    seed: int = 0,
    scales: tuple[int, ...] = (1, 2, 4),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` grey-scale patches ``[n, 1, size, size]`` float32 in [-1, 1].

    Each patch picks a photograph, a scale from ``scales`` (the photograph shrunk by that factor
    with antialiased area interpolation) and a position inside the split's columns, all from
    ``seed``. Deterministic: the same arguments give the same tensor.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"photo_patches: n must be an int >= 0, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"photo_patches: split must be one of {SPLITS}, got {split!r}")
    if not scales or any(not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"photo_patches: scales must be positive ints, got {scales!r}")
    sources = []
    for photo in _load_grey():
        columns = photo[:, :_TRAIN_COLUMNS] if split == "train" else photo[:, _TRAIN_COLUMNS:]
        for s in scales:
            shrunk = columns if s == 1 else F.avg_pool2d(columns[None, None], s)[0, 0]
            if min(shrunk.shape) < size:
                raise ValueError(
                    f"photo_patches: size {size} does not fit the {split} columns at scale {s} "
                    f"({tuple(shrunk.shape)})"
                )
            sources.append(shrunk)
    rng = np.random.RandomState(seed)
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        source = sources[rng.randint(len(sources))]
        top = rng.randint(source.shape[0] - size + 1)
        left = rng.randint(source.shape[1] - size + 1)
        out[i, 0] = source[top : top + size, left : left + size]
    return (out * 2.0 - 1.0).to(device)
