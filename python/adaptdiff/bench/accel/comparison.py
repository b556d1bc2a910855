"""PSNR at equal speedup (or equal compute): each adaptdiff cache's Pareto front against
diffusers' FirstBlockCache's, point by point."""

from __future__ import annotations

import math

OUR_CACHES = ("FirstBlockCache", "TeaCache", "MagCache", "TaylorSeer")
REFERENCE = "diffusers FirstBlockCache"


def method_front(results: list, method: str, key: str = "speedup") -> list[tuple[float, float]]:
    """A method's own Pareto points as (``key``, PSNR), ascending in ``key`` (speedup, or
    ``saved``: 1 - compute); rows that never skipped (PSNR capped at 99 dB) are left out."""
    pts = sorted(
        (getattr(r, key) if key != "saved" else 1.0 - r.compute, r.psnr)
        for r in results
        if r.method == method and r.psnr < 99 and not math.isnan(r.compute)
    )
    front, best = [], -math.inf
    for x, y in reversed(pts):
        if y > best:
            front.append((x, y))
            best = y
    return front[::-1]


def psnr_at(front: list[tuple[float, float]], x: float, tol: float = 0.05) -> float | None:
    """PSNR of a front at ``x`` by linear interpolation between its points; just outside its
    range (within ``tol`` relative: timing noise), the nearest end point's; otherwise None."""
    for (x0, y0), (x1, y1) in zip(front, front[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    near = [y for x0, y in front if abs(x0 - x) <= tol * max(abs(x), 1e-12)]
    return near[0] if near else None


TIE_DB = 0.1  # PSNR differences below this count as equal (float rounding, one seed)


def equal_speedup(results: list, key: str = "speedup") -> list[dict]:
    """At each point of diffusers' FirstBlockCache front: its PSNR and each adaptdiff cache's,
    interpolated along that cache's own front at the same ``key``; ``delta_db``: our best
    minus diffusers'."""
    ours = {m: method_front(results, m, key) for m in OUR_CACHES}
    rows = []
    for x, ref in method_front(results, REFERENCE, key):
        at = {m: psnr_at(f, x) for m, f in ours.items()}
        found = {m: v for m, v in at.items() if v is not None}
        best = max(found, key=found.get) if found else None
        delta = None if best is None else found[best] - ref
        rows.append({
            "matched_on": key, "at": x, "reference": REFERENCE, "reference_psnr": ref,
            "psnr": at, "best": best, "best_psnr": found.get(best), "delta_db": delta,
            "at_least_as_faithful": None if delta is None else delta >= -TIE_DB,
        })  # fmt: skip
    return rows


def _verdict(delta: float | None) -> str:
    if delta is None:
        return "no adaptdiff point"
    if abs(delta) < TIE_DB:
        return "equal"
    return f"ours {delta:+.1f} dB" if delta > 0 else f"diffusers {-delta:.1f} dB better"


def format_equal_speedup(rows: list[dict]) -> str:
    if not rows:
        return "(diffusers' FirstBlockCache never skipped a step: nothing to compare)"
    key = rows[0]["matched_on"]
    label = "speedup" if key == "speedup" else "compute saved"
    head = f"| {label} | diffusers FBC dB | " + " | ".join(f"{m} dB" for m in OUR_CACHES)
    lines = [head + " | best ours | verdict |", "|" + "---|" * (len(OUR_CACHES) + 4)]
    for r in rows:
        x = f"{r['at']:.2f}x" if key == "speedup" else f"{r['at']:.0%}"
        cells = [("" if r["psnr"][m] is None else f"{r['psnr'][m]:.1f}") for m in OUR_CACHES]
        best = "" if r["best"] is None else f"{r['best']} {r['best_psnr']:.1f}"
        lines.append(f"| {x} | {r['reference_psnr']:.1f} | " + " | ".join(cells)
                     + f" | {best} | {_verdict(r['delta_db'])} |")  # fmt: skip
    return "\n".join(lines)
