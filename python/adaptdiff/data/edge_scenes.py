"""Synthetic edge-detection scenes with known boundaries and simulated annotators.

Edge maps of the embedded digits would be edges of 8×8 images upsampled (blurry, with no
texture to tell object boundaries from texture edges), so the scenes are generated in code:
:func:`edge_scenes` paints 2–4 shapes (ellipses and triangles, painted in order, later ones on
top) over a background; every region (background and each shape) is filled with its own texture
— a sinusoidal grating of random frequency, orientation and contrast plus a mean level at least
0.3 away from the background's —
then the image is blurred (a 3×3 binomial filter, ~1 px) and Gaussian noise is added. Gratings
make texture edges that a gradient detector (Sobel) fires on but that are not object boundaries.

Ground truth is the 1-px boundary of the region map: a pixel is on the boundary when its region
differs from its right or lower neighbour's. Three simulated annotators each trace the boundary
of a slightly perturbed scene (every shape's centre and size jittered by up to ±0.75 px, so
their boundaries move by about a pixel) and drop about 10 % of it (the boundary pixels inside
randomly dropped 4×4 cells). ``label`` is their average, in {0, 1/3, 2/3, 1}, as multi-annotator
benchmarks (BSDS) average theirs.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ANNOTATORS = 3


def _shapes(rng: np.random.RandomState, size: int) -> list[dict]:
    shapes = []
    for _ in range(rng.randint(2, 5)):
        kind = "ellipse" if rng.rand() < 0.6 else "triangle"
        c = rng.uniform(0.2, 0.8, 2) * size
        if kind == "ellipse":
            shapes.append(
                dict(kind=kind, c=c, r=rng.uniform(0.12, 0.3, 2) * size, a=rng.uniform(0, np.pi))
            )
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 3))
            radius = rng.uniform(0.2, 0.4) * size
            shapes.append(dict(kind=kind, c=c, r=np.array([radius, radius]), a=angles))
    return shapes


def _regions(shapes: list[dict], size: int, jitter: np.ndarray | None = None) -> np.ndarray:
    """The region map ``[size, size]`` int (0 = background, k = shape k), painted in order."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.zeros((size, size), dtype=np.int64)
    for k, s in enumerate(shapes):
        c, r = s["c"], s["r"]
        if jitter is not None:
            c, r = c + jitter[k, :2], np.maximum(r + jitter[k, 2], 1.5)
        if s["kind"] == "ellipse":
            ca, sa = np.cos(s["a"]), np.sin(s["a"])
            u = (xx - c[0]) * ca + (yy - c[1]) * sa
            v = -(xx - c[0]) * sa + (yy - c[1]) * ca
            inside = (u / r[0]) ** 2 + (v / r[1]) ** 2 <= 1.0
        else:
            px, py = c[0] + r[0] * np.cos(s["a"]), c[1] + r[0] * np.sin(s["a"])
            signs = []
            for i in range(3):
                j = (i + 1) % 3
                signs.append((px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]))
            inside = (np.stack(signs) >= 0).all(0) | (np.stack(signs) <= 0).all(0)
        out[inside] = k + 1
    return out


def boundaries(regions: np.ndarray) -> np.ndarray:
    """1-px boundaries ``[..., H, W]`` float32 of region maps: a pixel whose region differs from
    its right or lower neighbour's."""
    out = np.zeros(regions.shape, dtype=bool)
    out[..., :, :-1] |= regions[..., :, :-1] != regions[..., :, 1:]
    out[..., :-1, :] |= regions[..., :-1, :] != regions[..., 1:, :]
    return out.astype(np.float32)


def _texture(rng: np.random.RandomState, size: int, mean: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    freq = rng.uniform(0.15, 0.6)  # cycles in radians per pixel
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    contrast = rng.uniform(0.0, 0.25)
    grating = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    return mean + contrast * grating


def edge_scenes(n: int, size: int = 32, *, seed: int = 0, noise: float = 0.05) -> dict:
    """``n`` scenes as tensors ``[n, ...]`` float32:

    - ``"images"`` ``[n, 1, size, size]`` in about [-1, 1];
    - ``"boundary"`` ``[n, 1, size, size]`` the true 1-px boundaries (0/1);
    - ``"annotators"`` ``[n, 3, size, size]`` the three simulated annotations (0/1);
    - ``"label"`` ``[n, 1, size, size]`` their mean, in {0, 1/3, 2/3, 1}.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"edge_scenes: n must be an int >= 0, got {n!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"edge_scenes: size must be an int >= 8, got {size!r}")
    if not noise >= 0:
        raise ValueError(f"edge_scenes: noise must be >= 0, got {noise!r}")
    rng = np.random.RandomState(seed)
    images = np.zeros((n, 1, size, size), np.float32)
    truth = np.zeros((n, 1, size, size), np.float32)
    annotators = np.zeros((n, ANNOTATORS, size, size), np.float32)
    cells = -(-size // 4)
    for i in range(n):
        shapes = _shapes(rng, size)
        regions = _regions(shapes, size)
        # every shape's mean level differs from the background's by at least 0.3
        background = rng.uniform(-0.6, 0.6)
        means = [background]
        for _ in shapes:
            step = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8)
            means.append(background + step if abs(background + step) <= 0.9 else background - step)
        textures = np.stack([_texture(rng, size, m) for m in means])
        images[i, 0] = np.take_along_axis(textures, regions[None], 0)[0]
        truth[i, 0] = boundaries(regions)
        for a in range(ANNOTATORS):
            jitter = rng.uniform(-0.75, 0.75, (len(shapes), 3))
            traced = boundaries(_regions(shapes, size, jitter))
            keep = rng.rand(cells, cells) >= 0.1
            traced *= np.kron(keep, np.ones((4, 4)))[:size, :size]
            annotators[i, a] = traced
    x = torch.from_numpy(images)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16.0)[None, None]
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
    g = torch.Generator().manual_seed(seed)
    x = x + noise * torch.randn(x.shape, generator=g)
    ann = torch.from_numpy(annotators)
    return {
        "images": x.clamp(-1.0, 1.0),
        "boundary": torch.from_numpy(truth),
        "annotators": ann,
        "label": ann.mean(1, keepdim=True),
    }
