"""Edge-detection scores in the manner of the BSDS benchmark: ODS / OIS F-measure with a pixel
tolerance, thinning, edge non-maximum suppression and the average crispness (AC).

For every threshold the edge probabilities are binarised and thinned to 1 px (:func:`thin`,
Zhang–Suen), then matched one-to-one against each annotator's boundary map separately within
``radius`` pixels (:func:`match`). Recall counts the annotators' matched pixels over all their
pixels; precision the predicted pixels matched to any annotator over all predicted pixels.
ODS sums the counts over the data set per threshold and takes the best F = 2PR/(P + R); OIS
takes each image's best threshold, sums the counts at those thresholds and computes F. CEval
(crispness-emphasised) thins only; SEval applies :func:`edge_nms` to the probabilities first.

Matching differs from the benchmark's: the benchmark solves a minimum-cost bipartite assignment
(``correspondPixels``); :func:`match` is greedy by distance — it visits the pixel offsets within
the radius nearest first (0, then the 4 neighbours at 1, then the 4 diagonals at √2, ...) and at
each offset pairs every still-unmatched prediction with the still-unmatched annotated pixel at
that offset. One offset maps predictions to distinct pixels, so every step is one vectorised
operation over all images and thresholds. The result is a maximal one-to-one matching within
the radius (every pair is within the radius, nothing matched twice) that prefers near pairs; it
can match fewer pairs than the optimal assignment in crowded places, so its F is a lower bound
of the benchmark's F for the same radius. With ``radius < 1`` only exact hits count.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_numpy(x, name: str, fn: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{fn}: {name} must be [..., H, W], got shape {x.shape}")
    return x


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` (zero outside)."""
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def thin(binary) -> np.ndarray:
    """Zhang–Suen thinning of binary maps ``[..., H, W]`` to 1-px skeletons (bool). A 1-px line
    is left unchanged."""
    img = _as_numpy(binary, "binary", "thin").astype(bool).copy()
    while True:
        changed = False
        for step in (0, 1):
            p = [
                _shift(img, dy, dx)
                for dy, dx in ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
            ]  # P2..P9: N, NE, E, SE, S, SW, W, NW
            count = sum(q.astype(np.int8) for q in p)
            transitions = sum((~p[i] & p[(i + 1) % 8]).astype(np.int8) for i in range(8))
            if step == 0:
                a, b = ~(p[0] & p[2] & p[4]), ~(p[2] & p[4] & p[6])
            else:
                a, b = ~(p[0] & p[2] & p[6]), ~(p[0] & p[4] & p[6])
            delete = img & (count >= 2) & (count <= 6) & (transitions == 1) & a & b
            if delete.any():
                img &= ~delete
                changed = True
        if not changed:
            return img


def edge_nms(prob) -> np.ndarray:
    """Edge non-maximum suppression of probability maps ``[..., H, W]``: a pixel is kept where it
    is not below its two neighbours across the edge (the direction of the map's own gradient,
    from 3×3 Sobel filters, quantised to 0°, 45°, 90°, 135°); suppressed pixels become 0."""
    e = _as_numpy(prob, "prob", "edge_nms").astype(np.float64)
    pad = np.pad(e, [(0, 0)] * (e.ndim - 2) + [(1, 1), (1, 1)], mode="edge")

    def at(dy, dx):
        h, w = e.shape[-2:]
        return pad[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (np.round(angle / 45.0).astype(int)) % 4  # 0: x, 1: diagonal, 2: y, 3: anti-diag.
    keep = np.zeros(e.shape, dtype=bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ok = (e >= at(dy, dx)) & (e >= at(-dy, -dx))
        keep |= (sector == k) & ok
    return np.where(keep, e, 0.0)


def _offsets(radius: float) -> list[tuple[int, int]]:
    r = int(math.floor(radius))
    offs = [
        (dy, dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if dy * dy + dx * dx <= radius * radius + 1e-9
    ]
    return sorted(offs, key=lambda o: (o[0] ** 2 + o[1] ** 2, o))


def match(pred, gt, radius: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy nearest-first one-to-one matching of binary maps ``pred`` and ``gt``
    (``[..., H, W]``, broadcastable) within ``radius`` pixels; returns the boolean maps of the
    matched predicted pixels and the matched annotated pixels (module docstring)."""
    p = _as_numpy(pred, "pred", "match").astype(bool)
    g = _as_numpy(gt, "gt", "match").astype(bool)
    if radius < 0:
        raise ValueError(f"match: radius must be >= 0, got {radius}")
    p, g = np.broadcast_arrays(p, g)
    free_p, free_g = p.copy(), g.copy()
    for dy, dx in _offsets(radius):
        # pairs (pred at y, x) with (gt at y + dy, x + dx)
        pair = free_p & _shift(free_g, dy, dx)
        if pair.any():
            free_p &= ~pair
            free_g &= ~_shift(pair, -dy, -dx)
    return p & ~free_p, g & ~free_g


def _f(cnt_r, sum_r, cnt_p, sum_p):
    r = np.divide(cnt_r, sum_r, out=np.zeros_like(cnt_r, dtype=float), where=sum_r > 0)
    p = np.divide(cnt_p, sum_p, out=np.zeros_like(cnt_p, dtype=float), where=sum_p > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(p, dtype=float), where=(p + r) > 0)
    return f, p, r


def average_crispness(prob) -> float:
    """AC: the mean over images ``[N, H, W]`` of ``Σ NMS(E) / Σ E`` (1 for a perfectly thin
    map; images with ``Σ E = 0`` are skipped, NaN when all are)."""
    e = _as_numpy(prob, "prob", "average_crispness").astype(np.float64)
    e = e.reshape(-1, *e.shape[-2:])
    total = e.sum((1, 2))
    kept = edge_nms(e).sum((1, 2))
    ok = total > 0
    return float(np.mean(kept[ok] / total[ok])) if ok.any() else float("nan")


def edge_scores(
    prob,
    annotations,
    *,
    radius: float = 1.0,
    thresholds: int | np.ndarray = 25,
    nms: bool = False,
) -> dict[str, float]:
    """ODS / OIS F-measures (with ODS's precision, recall and threshold) of edge probabilities
    ``prob [N, H, W]`` (or ``[N, 1, H, W]``) in [0, 1] against ``annotations [N, A, H, W]``
    (each annotator's binary boundary map), and the average crispness ``ac``.

    ``thresholds``: a count (evenly spaced inside (0, 1)) or the values. ``nms``: SEval (edge
    NMS first) instead of CEval (thinning only)."""
    e = _as_numpy(prob, "prob", "edge_scores").astype(np.float64)
    a = _as_numpy(annotations, "annotations", "edge_scores").astype(bool)
    if e.ndim == 4:
        if e.shape[1] != 1:
            raise ValueError(f"edge_scores: prob must be [N, H, W] or [N, 1, H, W], got {e.shape}")
        e = e[:, 0]
    if e.ndim != 3 or a.ndim != 4 or a.shape[0] != e.shape[0] or a.shape[2:] != e.shape[1:]:
        raise ValueError(
            f"edge_scores: prob [N, H, W] and annotations [N, A, H, W] must agree, got "
            f"{e.shape} and {a.shape}"
        )
    ts = (
        np.linspace(0, 1, int(thresholds) + 2)[1:-1]
        if np.isscalar(thresholds)
        else np.asarray(thresholds, dtype=np.float64)
    )
    if ts.size < 1:
        raise ValueError("edge_scores: thresholds must give at least one threshold")
    src = edge_nms(e) if nms else e
    binary = thin(src[None] >= ts[:, None, None, None])  # [T, N, H, W]
    # per annotator: matched annotated pixels; a prediction counts when any annotator matches it
    matched_p = np.zeros(binary.shape, dtype=bool)
    cnt_r = np.zeros(binary.shape[:2])
    for k in range(a.shape[1]):
        mp, mg = match(binary, a[None, :, k], radius)
        matched_p |= mp
        cnt_r += mg.sum((-2, -1))
    sum_r = np.broadcast_to(a.sum((1, 2, 3))[None].astype(float), cnt_r.shape)
    cnt_p = matched_p.sum((-2, -1)).astype(float)
    sum_p = binary.sum((-2, -1)).astype(float)
    f_ods, p_ods, r_ods = _f(cnt_r.sum(1), sum_r.sum(1), cnt_p.sum(1), sum_p.sum(1))
    best = int(np.argmax(f_ods))
    f_img, _, _ = _f(cnt_r, sum_r, cnt_p, sum_p)  # [T, N]
    pick = np.argmax(f_img, axis=0)
    cols = np.arange(e.shape[0])
    f_ois, _, _ = _f(
        cnt_r[pick, cols].sum(), sum_r[pick, cols].sum(), cnt_p[pick, cols].sum(),
        sum_p[pick, cols].sum(),
    )  # fmt: skip
    return {
        "ods": float(f_ods[best]),
        "ods_precision": float(p_ods[best]),
        "ods_recall": float(r_ods[best]),
        "ods_threshold": float(ts[best]),
        "ois": float(f_ois),
        "ac": average_crispness(e),
    }


def sobel(images) -> np.ndarray:
    """The Sobel baseline: gradient magnitude of images ``[N, H, W]`` (or ``[N, 1, H, W]``),
    each divided by its maximum so it lies in [0, 1]."""
    x = _as_numpy(images, "images", "sobel").astype(np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    pad = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = x.shape[-2:]

    def at(dy, dx):
        return pad[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.hypot(gx, gy)
    peak = mag.reshape(*mag.shape[:-2], -1).max(-1)[..., None, None]
    return np.divide(mag, peak, out=np.zeros_like(mag), where=peak > 0)
