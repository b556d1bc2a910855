"""Moving digits: short clips of the embedded digits translated or rotated frame by frame, with
the motion type as a label, and the tools that read a motion back from any clip.

A clip is ``[F, 1, size, size]`` in [-1, 1] (F frames, 8 by default). The digit (scikit-learn's
digits at ``digit_size`` pixels, :func:`adaptdiff.data.digits`) sits on a blank (-1) canvas of
``size`` pixels; frame ``k`` shows it moved by ``(k - (F-1)/2)`` times the motion's per-frame step,
so the clip is centred on the canvas. The motions (:data:`MOTIONS`) are four translations of
``speed`` pixels per frame (``right``, ``left``, ``down``, ``up``) and two rotations about the
canvas centre of ``angle`` degrees per frame (``cw``, ``ccw``: clockwise as displayed, y down).
Rendering is one ``F.affine_grid`` / ``F.grid_sample`` (bilinear) per clip, so moves are
sub-pixel.

Reading a motion back (for generated clips, where no label exists):

- :func:`centroid_velocity`: the mean per-frame displacement ``(dx, dy)`` of the intensity
  centroid, in pixels; a translation reads as its step, a rotation about the centre as about 0.
- :func:`classify_motion`: the motion (or ``"static"``) whose one-frame step, applied to frame k,
  best matches frame k+1 (least squared error summed over the clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .digits import digits

MOTIONS = ("right", "left", "down", "up", "cw", "ccw")
STATIC = "static"  # classify_motion's answer for a clip that does not move


def motion_step(motion: str, speed: float = 0.75, angle: float = 8.0) -> tuple[float, float, float]:
    """One frame's step ``(dx, dy, degrees)`` of ``motion`` (x right, y down, degrees clockwise
    as displayed); ``"static"`` is ``(0, 0, 0)``."""
    steps = {
        "right": (speed, 0.0, 0.0),
        "left": (-speed, 0.0, 0.0),
        "down": (0.0, speed, 0.0),
        "up": (0.0, -speed, 0.0),
        "cw": (0.0, 0.0, angle),
        "ccw": (0.0, 0.0, -angle),
        STATIC: (0.0, 0.0, 0.0),
    }
    if motion not in steps:
        raise ValueError(
            f"motion_step: motion must be one of {MOTIONS + (STATIC,)}, got {motion!r}"
        )
    return steps[motion]


def _theta(dx: torch.Tensor, dy: torch.Tensor, degrees: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 2, 3]`` affine grids that move content by ``(dx, dy)`` pixels and rotate it by
    ``degrees`` (clockwise as displayed) about the canvas centre: output pixel p samples the
    input at ``R(-a) (p - s)`` in normalised coordinates."""
    a = torch.deg2rad(degrees.double())
    cos, sin = a.cos(), a.sin()
    sx, sy = 2 * dx.double() / size, 2 * dy.double() / size  # pixels -> normalised units
    # R(-a) = [[cos, sin], [-sin, cos]] (y down: positive a turns clockwise on screen)
    row0 = torch.stack([cos, sin, -(cos * sx + sin * sy)], -1)
    row1 = torch.stack([-sin, cos, -(-sin * sx + cos * sy)], -1)
    return torch.stack([row0, row1], 1).float()


def warp(images: torch.Tensor, dx, dy, degrees) -> torch.Tensor:
    """Images ``[N, 1, H, H]`` in [-1, 1] moved by ``(dx, dy)`` pixels and rotated by ``degrees``
    about the centre (each a float or an ``[N]`` tensor); uncovered pixels are background (-1)."""
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"warp: images must be [N, C, H, H], got {list(images.shape)}")
    n, size = images.shape[0], images.shape[-1]
    dx, dy, degrees = (torch.as_tensor(v, dtype=torch.float64).expand(n) for v in (dx, dy, degrees))
    theta = _theta(dx, dy, degrees, size).to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(
        images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out - 1


def render_clips(
    images: torch.Tensor,
    motions: list[str] | tuple[str, ...],
    num_frames: int = 8,
    speed: float = 0.75,
    angle: float = 8.0,
) -> torch.Tensor:
    """Clips ``[N, F, 1, H, H]`` of ``images [N, 1, H, H]`` (digits already on their canvas), each
    moving by its ``motions[i]``, centred on frame ``(F-1)/2``."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"render_clips: images must be [N, 1, H, H], got {list(images.shape)}")
    if len(motions) != images.shape[0]:
        raise ValueError(f"render_clips: {images.shape[0]} images but {len(motions)} motions")
    if num_frames < 1:
        raise ValueError(f"render_clips: num_frames must be >= 1, got {num_frames}")
    steps = torch.tensor([motion_step(m, speed, angle) for m in motions], dtype=torch.float64)
    frames = []
    for k in range(num_frames):
        offset = k - (num_frames - 1) / 2
        frames.append(warp(images, *(steps * offset).unbind(1)))
    return torch.stack(frames, 1)  # [N, F, 1, H, H]


def moving_digits(
    num_clips: int,
    *,
    size: int = 16,
    digit_size: int = 10,
    num_frames: int = 8,
    motions: tuple[str, ...] = MOTIONS,
    classes: tuple[int, ...] | None = None,
    split: str = "train",
    speed: float = 0.75,
    angle: float = 8.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_clips`` random clips: ``(clips [N, F, 1, size, size], digit labels [N], motion
    indices [N] into motions)``. Digits are drawn (seeded) from ``split`` of the embedded digits,
    restricted to ``classes`` when given; each clip gets a random motion of ``motions``."""
    if digit_size > size:
        raise ValueError(f"moving_digits: digit_size ({digit_size}) must be <= size ({size})")
    bad = [m for m in motions if m not in MOTIONS]
    if not motions or bad:
        raise ValueError(
            f"moving_digits: motions must be a non-empty subset of {MOTIONS}, got {bad}"
        )
    images, labels = digits(digit_size, split)
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(list(classes)))
        if not keep.any():
            raise ValueError(f"moving_digits: no digits of classes {classes}")
        images, labels = images[keep], labels[keep]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(labels), (num_clips,), generator=g)
    motion = torch.randint(0, len(motions), (num_clips,), generator=g)
    canvas = place(images[pick], size)
    clips = render_clips(canvas, [motions[i] for i in motion.tolist()], num_frames, speed, angle)
    return clips, labels[pick], motion


def place(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``[N, 1, h, h]`` centred on a blank (-1) ``size x size`` canvas."""
    h = images.shape[-1]
    before = (size - h) // 2
    return F.pad(images, (before, size - h - before) * 2, value=-1.0)


def _weights(clips: torch.Tensor) -> torch.Tensor:
    return ((clips.clamp(-1, 1) + 1) / 2)[:, :, 0]  # [N, F, H, W], ink in [0, 1]


def centroids(clips: torch.Tensor) -> torch.Tensor:
    """Intensity centroids ``[N, F, 2]`` (x, y in pixels) of clips ``[N, F, 1, H, W]``."""
    if clips.dim() != 5 or clips.shape[2] != 1:
        raise ValueError(f"centroids: clips must be [N, F, 1, H, W], got {list(clips.shape)}")
    w = _weights(clips).double()
    mass = w.sum((2, 3)).clamp_min(1e-6)
    ys = torch.arange(w.shape[2], dtype=torch.float64)[:, None]
    xs = torch.arange(w.shape[3], dtype=torch.float64)[None, :]
    cx = (w * xs).sum((2, 3)) / mass
    cy = (w * ys).sum((2, 3)) / mass
    return torch.stack([cx, cy], -1).float()


def centroid_velocity(clips: torch.Tensor) -> torch.Tensor:
    """Mean per-frame centroid displacement ``[N, 2]`` (dx, dy in pixels per frame): the slope
    of a least-squares line through each clip's centroids."""
    c = centroids(clips).double()  # [N, F, 2]
    f = c.shape[1]
    if f < 2:
        raise ValueError("centroid_velocity: clips need at least 2 frames")
    k = torch.arange(f, dtype=torch.float64) - (f - 1) / 2
    return ((c * k[None, :, None]).sum(1) / k.square().sum()).float()


def classify_motion(
    clips: torch.Tensor,
    motions: tuple[str, ...] = MOTIONS,
    speed: float = 0.75,
    angle: float = 8.0,
) -> list[str]:
    """Per clip, the motion of ``motions + ("static",)`` whose one-frame step maps each frame
    onto the next with the least squared error (summed over the clip's frame pairs)."""
    if clips.dim() != 5 or clips.shape[1] < 2:
        raise ValueError(
            f"classify_motion: clips must be [N, F >= 2, 1, H, W], got {list(clips.shape)}"
        )
    n, f = clips.shape[:2]
    candidates = tuple(motions) + (STATIC,)
    x = clips.clamp(-1, 1)
    now, nxt = x[:, :-1].reshape(-1, *x.shape[2:]), x[:, 1:].reshape(-1, *x.shape[2:])
    errors = []
    for m in candidates:
        moved = warp(now, *motion_step(m, speed, angle))
        errors.append((moved - nxt).square().reshape(n, f - 1, -1).sum((1, 2)))
    best = torch.stack(errors, 1).argmin(1)
    return [candidates[i] for i in best.tolist()]


def frame_grid(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``[N, F, 1, H, W]`` as ``[N*F, 1, H, W]`` images, clip after clip (one row of F
    frames per clip in :func:`adaptdiff.recipes.digits.save_grid` with ``nrow=F``)."""
    return clips.reshape(-1, *clips.shape[2:])
