"""``adaptdiff calibrate --method bac|ecad``: schedule searches that write a schedule JSON.

Options (``--option KEY=VALUE``): bac: ``budget`` (update steps per unit, an int or a
fraction of the calls; default 0.5), ``num_bu_blocks`` (3), ``final_steps`` (2), ``metric``
(cosine | l1). ecad: ``pop`` (16), ``generations`` (6), ``target`` (the largest compute fraction
to pick from the Pareto front; default 0.6) — the whole front is kept in ``meta.front``.
"""

from __future__ import annotations

import torch

from ..calibration import CalibrationSetup, model_signature, register_calibrator
from ..hooks import layout
from .ecad import ecad_search
from .producers import bac_schedule, collect_features


def _number(text, cast):
    try:
        return cast(text)
    except (TypeError, ValueError):
        raise ValueError(f"option value {text!r} is not a {cast.__name__}") from None


def _budget(text) -> int | float:
    value = _number(text, float)
    return int(value) if value >= 1 and value == int(value) else value


@register_calibrator("bac", "BAC schedule: per-unit optimal update steps + bubbling union")
def calibrate_bac(setup: CalibrationSetup) -> dict:
    opts = setup.options
    feats: dict = {}
    for r in range(setup.runs):  # runs pooled along the batch: one similarity per unit
        got = collect_features(setup.model, lambda r=r: setup.sample(r, []))
        for k, v in got.items():
            feats[k] = v if k not in feats else torch.cat([feats[k], v], 1)
    sched = bac_schedule(
        layout(setup.model), feats, _budget(opts.get("budget", 0.5)),
        num_bu_blocks=_number(opts.get("num_bu_blocks", 3), int),
        final_steps=_number(opts.get("final_steps", 2), int), metric=opts.get("metric", "cosine"),
    )  # fmt: skip
    sched.model, sched.meta["sampling"] = model_signature(setup.model), setup.sampling
    return sched.to_dict()


@register_calibrator("ecad", "ECAD schedule: NSGA-II Pareto search (-PSNR vs compute)")
def calibrate_ecad(setup: CalibrationSetup) -> dict:
    opts = setup.options

    def run(accelerators):
        return torch.cat([setup.sample(r, accelerators) for r in range(setup.runs)])

    steps = setup.sampling.get("calls") or setup.sampling["steps"]
    schedules, _ = ecad_search(
        setup.model, run, steps, pop_size=_number(opts.get("pop", 16), int),
        generations=_number(opts.get("generations", 6), int),
    )  # fmt: skip
    target = _number(opts.get("target", 0.6), float)
    fitting = [s for s in schedules if s.meta["compute_fraction"] <= target] or schedules[-1:]
    best = fitting[0]  # the front is sorted by quality loss: the most faithful that fits
    best.model = model_signature(setup.model)
    best.meta["front"] = [[s.meta["quality_loss"], s.meta["compute_fraction"]] for s in schedules]
    best.meta["sampling"] = setup.sampling
    return best.to_dict()
