"""Calibration: the JSON format, its validation, and the method registry behind
``adaptdiff calibrate``.

A calibration file is::

    {"format": "adaptdiff.calibration", "version": 1, "method": "teacache",
     "model": {"class": "DiT", "blocks": 12, "parameters": 130000000},
     "sampling": {...how the runs were drawn...}, <the method's fields>}

:func:`load_calibration` checks the header, the method and that the model it is used on has
the same class, block count and parameter count, and raises a ``ValueError`` saying which field
is wrong. A method is one registered function (see :func:`register_calibrator`): it gets a
:class:`CalibrationSetup` (the model and a function that draws one exact sampling run with
extra accelerators) and returns its fields; TeaCache and MagCache are registered here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..ops import rel_l1
from .hooks import ATTR, find_blocks, find_components

FORMAT, VERSION = "adaptdiff.calibration", 1

__all__ = [
    "CALIBRATORS",
    "CalibrationSetup",
    "load_calibration",
    "model_signature",
    "record_stack",
    "register_calibrator",
    "run_calibration",
]


def model_signature(model: nn.Module) -> dict:
    """What a calibration must match: class name, number of blocks, number of parameters."""
    return {
        "class": type(model).__name__,
        "blocks": len(find_blocks(model)),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def read_document(source, kind: str, fmt: str, version: int) -> tuple[dict, str]:
    """A JSON document of ``adaptdiff.accel`` (a path, or an already loaded dict) with its
    ``format`` and ``version`` checked; returns it and the name its errors use. ``kind`` names
    it in messages ("calibration", "schedule")."""
    where = str(source) if isinstance(source, (str, Path)) else kind
    if isinstance(source, (str, Path)):
        try:
            doc = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise ValueError(f"{kind} file {source} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{kind} file {source} is not JSON: {e}") from None
    else:
        doc = source
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{where}: not an adaptdiff {kind} (format must be {fmt!r})")
    if doc.get("version") != version:
        raise ValueError(
            f"{where}: version {doc.get('version')!r} unsupported (expected {version})"
        )
    return doc, where


def load_calibration(source, method: str, model: nn.Module | None = None) -> dict:
    """Read and validate a calibration (a path or an already loaded dict)."""
    doc, where = read_document(source, "calibration", FORMAT, VERSION)
    if doc.get("method") != method:
        raise ValueError(f"{where}: calibrates {doc.get('method')!r}, not {method!r}")
    if model is not None:
        want, got = model_signature(model), doc.get("model", {})
        for key in want:
            if got.get(key) != want[key]:
                raise ValueError(
                    f"{where}: made for a model with {key}={got.get(key)!r}, this one has "
                    f"{key}={want[key]!r} (calibrate this model: adaptdiff calibrate)"
                )
    field_check = _FIELD_CHECKS.get(method)
    if field_check is not None:
        field_check(doc, where)
    return doc


def _check_float_list(doc, key, where, min_len=1):
    v = doc.get(key)
    ok = isinstance(v, list) and len(v) >= min_len and all(isinstance(x, (int, float)) for x in v)
    if not ok:
        raise ValueError(f"{where}: {key!r} must be a list of >= {min_len} numbers, got {v!r}")


def _check_magcache(doc, where):
    _check_float_list(doc, "mag_ratios", where, 2)
    if "calls" in doc and doc["calls"] != len(doc["mag_ratios"]):
        raise ValueError(
            f"{where}: 'mag_ratios' has {len(doc['mag_ratios'])} values but 'calls' is "
            f"{doc['calls']}"
        )


_FIELD_CHECKS = {
    "teacache": lambda d, w: _check_float_list(d, "coefficients", w),
    "magcache": _check_magcache,
}


# --------------------------------------------------------------------------- registry


@dataclass
class CalibrationSetup:
    """What a calibrator works with.

    ``sample(run, accelerators)`` draws calibration run ``run`` (0 ≤ run < ``runs``) exactly
    (no caching) with the extra ``accelerators`` and returns the samples; ``sampling`` describes
    it for the JSON header; ``options`` holds method options from the command line.
    """

    model: nn.Module
    sample: Callable
    runs: int = 4
    sampling: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)


@dataclass
class Calibrator:
    fn: Callable[[CalibrationSetup], dict]
    help: str


CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(name: str, help: str = ""):
    """Decorator: ``@register_calibrator("linear_ag", "...")`` on ``fn(setup) -> fields`` adds
    ``adaptdiff calibrate --method linear_ag``; its fields are written after the header."""

    def deco(fn):
        CALIBRATORS[name] = Calibrator(fn, help)
        return fn

    return deco


def run_calibration(method: str, setup: CalibrationSetup, out=None) -> dict:
    """Run a registered calibrator and (with ``out``) write its JSON; returns the document.

    A calibrator's fields go under the calibration header, unless they are a whole document
    of another format (a ``"format"`` key: e.g. the schedules of ``bac`` and ``ecad``).
    """
    if method not in CALIBRATORS:
        raise ValueError(f"method must be one of {sorted(CALIBRATORS)}, got {method!r}")
    fields = CALIBRATORS[method].fn(setup)
    if "format" in fields:
        if out is not None:
            Path(out).write_text(json.dumps(fields, indent=1))
        return fields
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "model": model_signature(setup.model),
        "sampling": setup.sampling,
        **fields,
    }
    if out is not None:
        Path(out).write_text(json.dumps(doc, indent=1))
    return doc


# --------------------------------------------------------------------------- recording


class _StackRecorder:
    """Per model call: block 0's modulated input and the stack residual (hidden stream)."""

    def __init__(self, model: nn.Module):
        if getattr(model, ATTR, None) is not None:
            raise ValueError("calibrate: remove the model's adaptdiff.accel hooks first")
        blocks = [b for _, b in find_blocks(model)]
        comps = find_components(blocks[0])
        if not comps:
            raise ValueError(f"calibrate: block {type(blocks[0]).__name__} has no components")
        self.calls: list[dict] = []
        self.handles = [
            blocks[0].register_forward_pre_hook(self._block_in, with_kwargs=True),
            getattr(blocks[0], comps[0]).register_forward_pre_hook(self._mod_in, with_kwargs=True),
            blocks[-1].register_forward_hook(self._block_out),
        ]

    @staticmethod
    def _first(args, kwargs):
        if args:
            return args[0]
        return kwargs.get("hidden_states", kwargs.get("x", next(iter(kwargs.values()), None)))

    def _block_in(self, module, args, kwargs):
        self.calls.append({"in": self._first(args, kwargs)})

    def _mod_in(self, module, args, kwargs):
        self.calls[-1].setdefault("mod", self._first(args, kwargs).detach())

    def _block_out(self, module, args, out):
        hidden = out if isinstance(out, torch.Tensor) else out[1]
        call = self.calls[-1]
        call["res"] = (hidden - call.pop("in")).detach()

    def close(self):
        for h in self.handles:
            h.remove()


def record_stack(setup: CalibrationSetup) -> list[list[dict]]:
    """Per run, per model call: ``mod`` (block 0's modulated input) and ``res`` (the stack's
    residual), from exact sampling runs."""
    from ..samplers import Accelerator

    out = []
    for run in range(setup.runs):
        rec = _StackRecorder(setup.model)
        try:
            setup.sample(run, [Accelerator()])
        finally:
            rec.close()
        out.append(rec.calls)
    return out


def _changes(calls: list[dict], key: str) -> list[torch.Tensor]:
    """rel-L1 change of ``key`` between consecutive calls, per sample: one [B] per call > 0."""
    return [rel_l1(b[key], a[key]) for a, b in zip(calls, calls[1:], strict=False)]


@register_calibrator(
    "teacache",
    "fit TeaCache's polynomial: modulated-input change -> stack-residual change (numpy.polyfit)",
)
def calibrate_teacache(setup: CalibrationSetup) -> dict:
    import numpy as np

    degree = int(setup.options.get("degree", 4))
    xs, ys = [], []
    for calls in record_stack(setup):
        for dx, dy in zip(_changes(calls, "mod"), _changes(calls, "res"), strict=True):
            xs += dx.tolist()
            ys += dy.tolist()
    x, y = np.asarray(xs), np.asarray(ys)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) <= degree:
        raise ValueError(
            f"calibrate teacache: {len(x)} data points for a degree-{degree} fit; use more "
            "--runs or --steps"
        )
    coeffs = np.polyfit(x, y, degree)
    rms = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    return {
        "coefficients": [float(c) for c in coeffs],
        "degree": degree,
        "points": len(x),
        "fit_rms": rms,
        "input_change_range": [float(x.min()), float(x.max())],
    }


@register_calibrator(
    "magcache", "per-call magnitude ratio ||r_t|| / ||r_{t-1}|| of the stack residual (mean)"
)
def calibrate_magcache(setup: CalibrationSetup) -> dict:
    per_run = []
    for calls in record_stack(setup):
        ratios = [1.0]
        for a, b in zip(calls, calls[1:], strict=False):
            num, den = b["res"].float().norm(dim=-1), a["res"].float().norm(dim=-1)
            ratios.append(float((num / den.clamp_min(1e-12)).mean()))
        per_run.append(ratios)
    lengths = {len(r) for r in per_run}
    if len(lengths) != 1:
        raise ValueError(f"calibrate magcache: runs made different call counts {sorted(lengths)}")
    t = torch.tensor(per_run, dtype=torch.float64)
    return {
        "mag_ratios": t.mean(0).tolist(),
        "mag_ratios_std": t.std(0, unbiased=False).tolist(),
        "calls": t.shape[1],
    }
