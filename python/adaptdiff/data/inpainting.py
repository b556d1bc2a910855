"""Reference-guided inpainting built from the digits: a small stand-in for virtual try-on.

A virtual try-on model repaints the masked garment region of a person image, guided by a
picture of the garment. Here the "person" is a digit with a large region hidden, and the
"garment" is *another* image of the same digit class: the reference says which digit to draw,
not the exact strokes (the two images differ), just as a garment photo is not the garment as
worn. Every sample is a triple (as try-on data sets give them):

- ``masked``: the target with the hidden pixels set to 0 (a value the digits' background, -1,
  never takes), and ``mask``: 1 on the hidden region, 0 where the target is kept;
- ``reference``: another image of the target's class, drawn from the *same split* (a test
  target never sees a training image, and the other way round);
- ``target``: the full digit, the model's goal.

Holes (:func:`hole_masks`): ``"half"`` hides one of the four halves (left, right, top or
bottom, drawn per sample); ``"box"`` hides a random box with sides between half and three
quarters of the image. The splits are :func:`adaptdiff.data.digits`' (30 test images per
class, the rest for training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .digits import NUM_CLASSES, digits

__all__ = ["MASK_KINDS", "InpaintingData", "Triples", "hole_masks"]

MASK_KINDS = ("half", "box")


def hole_masks(
    n: int, size: int, kind: str = "half", *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[n, 1, size, size]`` float masks, 1 on the hidden region (see the module docstring)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"hole_masks: kind must be one of {MASK_KINDS}, got {kind!r}")
    if n < 0 or size < 4:
        raise ValueError(f"hole_masks: n must be >= 0 and size >= 4, got n={n}, size={size}")
    masks = torch.zeros(n, 1, size, size)
    half = size // 2
    if kind == "half":
        sides = torch.randint(0, 4, (n,), generator=generator).tolist()
        for i, side in enumerate(sides):
            if side == 0:
                masks[i, :, :, :half] = 1  # left
            elif side == 1:
                masks[i, :, :, half:] = 1  # right
            elif side == 2:
                masks[i, :, :half] = 1  # top
            else:
                masks[i, :, half:] = 1  # bottom
        return masks
    high = (3 * size) // 4
    hw = torch.randint(half, high + 1, (n, 2), generator=generator)
    u = torch.rand(n, 2, generator=generator)
    for i in range(n):
        h, w = int(hw[i, 0]), int(hw[i, 1])
        top, left = int(u[i, 0] * (size - h + 1)), int(u[i, 1] * (size - w + 1))
        masks[i, :, top : top + h, left : left + w] = 1
    return masks


@dataclass(frozen=True)
class Triples:
    """A batch of inpainting triples; every image tensor is ``[B, 1, H, W]`` in [-1, 1].

    ``target_index`` and ``reference_index`` index the split's images
    (:attr:`InpaintingData.images`); ``labels`` is the class of both.
    """

    masked: torch.Tensor
    mask: torch.Tensor
    reference: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    target_index: torch.Tensor
    reference_index: torch.Tensor


class InpaintingData:
    """Inpainting triples of one split of the digits.

    Args:
        size: image side (16 or 32; the 8x8 digits are upsampled).
        split: ``"train"`` or ``"test"``; targets and references both come from it.
        mask: the hole kind, ``"half"`` or ``"box"`` (:func:`hole_masks`).
        seed: the digits' split seed (:func:`adaptdiff.data.digits`).
        per_class: keep only the first ``per_class`` images of each class of the split (None:
            all); a smaller set for quick runs.
    """

    def __init__(
        self,
        size: int = 16,
        split: str = "train",
        *,
        mask: str = "half",
        seed: int = 0,
        per_class: int | None = None,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"InpaintingData: split must be 'train' or 'test', got {split!r}")
        if mask not in MASK_KINDS:
            raise ValueError(f"InpaintingData: mask must be one of {MASK_KINDS}, got {mask!r}")
        self.size, self.split, self.mask_kind = size, split, mask
        self.images, self.labels = digits(size, split, seed=seed)
        if per_class is not None:
            if per_class < 2:
                raise ValueError(f"InpaintingData: per_class must be >= 2, got {per_class}")
            keep = (
                torch.cat(
                    [
                        torch.nonzero(self.labels == c).flatten()[:per_class]
                        for c in range(NUM_CLASSES)
                    ]
                )
                .sort()
                .values
            )
            self.images, self.labels = self.images[keep], self.labels[keep]
        self.members = [torch.nonzero(self.labels == c).flatten() for c in range(NUM_CLASSES)]
        # the rank of each image among its class's members
        self.rank = torch.empty(len(self.labels), dtype=torch.long)
        for m in self.members:
            self.rank[m] = torch.arange(len(m))

    def __len__(self) -> int:
        return len(self.labels)

    def references(
        self, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """For each target index, a uniformly drawn *other* index of the same class."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise ValueError(f"InpaintingData.references: index out of range [0, {len(self)})")
        u = torch.rand(index.shape, generator=generator)
        out = torch.empty_like(index)
        for i, (j, c) in enumerate(zip(index.tolist(), self.labels[index].tolist(), strict=True)):
            m = self.members[c]
            k = min(int(u[i] * (len(m) - 1)), len(m) - 2)  # one of the len(m) - 1 others
            k += int(k >= self.rank[j])  # skip the target itself
            out[i] = m[k]
        return out

    def triples(self, index: torch.Tensor, generator: torch.Generator | None = None) -> Triples:
        """The triples of the targets ``index`` (references and holes drawn with
        ``generator``)."""
        index = torch.as_tensor(index, dtype=torch.long)
        ref = self.references(index, generator)
        mask = hole_masks(len(index), self.size, self.mask_kind, generator=generator)
        target = self.images[index]
        return Triples(
            masked=target * (1 - mask), mask=mask, reference=self.images[ref], target=target,
            labels=self.labels[index], target_index=index, reference_index=ref,
        )  # fmt: skip

    def batch(self, n: int, generator: torch.Generator | None = None) -> Triples:
        """``n`` random triples (targets drawn with replacement)."""
        if n < 1:
            raise ValueError(f"InpaintingData.batch: n must be >= 1, got {n}")
        return self.triples(torch.randint(0, len(self), (n,), generator=generator), generator)

    def evaluation(self, n: int, seed: int = 0) -> Triples:
        """``n`` fixed triples balanced over the classes (classes 0..9, 0..9, ...; at most one
        per image), the references and holes drawn from ``seed``."""
        per_class = min(len(m) for m in self.members)
        if not 1 <= n <= per_class * NUM_CLASSES:
            raise ValueError(
                f"InpaintingData.evaluation: n must be in [1, {per_class * NUM_CLASSES}], got {n}"
            )
        order = torch.stack([m[:per_class] for m in self.members], 1).flatten()
        return self.triples(order[:n], torch.Generator().manual_seed(seed))
