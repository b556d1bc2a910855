"""``adaptdiff calibrate``: run a registered calibrator on a digits checkpoint or a named
random-weight DiT and write its JSON."""

from __future__ import annotations

import argparse
import functools
import json

import torch

__all__ = ["add_calibrate_parser", "calibration_setup", "random_dit"]


def random_dit(name: str, seed: int = 0, gate_std: float = 0.02, **overrides):
    """A named DiT (``create_dit``) for flow matching with random weights everywhere: the
    adaLN-Zero layers and the output layer too (zero gates would make every block the identity
    and the output 0)."""
    from ..models.dit import create_dit

    torch.manual_seed(seed)
    model = create_dit(name, **{"time_scale": 1000.0, **overrides})
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "adaLN_modulation"):
                torch.nn.init.normal_(m.adaLN_modulation[-1].weight, std=gate_std)
                torch.nn.init.normal_(m.adaLN_modulation[-1].bias, std=gate_std)
        torch.nn.init.xavier_uniform_(model.final_layer.linear.weight)
    return model.eval()


def calibration_setup(model, *, method="euler", steps=20, runs=4, batch=2, guidance=1.0, seed=0,
                      options=None):  # fmt: skip
    """A :class:`CalibrationSetup` drawing flow-matching runs of ``model`` (a DiT): run ``r``
    uses noise seed ``seed + r`` and labels ``0..batch-1`` (mod the class count)."""
    from ..samplers import sample
    from .calibration import CalibrationSetup

    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    cond, uncond = {}, None
    if cfg.num_classes:
        labels = torch.arange(batch) % cfg.num_classes
        cond = {"y": labels}
        uncond = {"y": torch.full_like(labels, model.null_label)} if guidance != 1.0 else None

    def draw(run, accelerators):
        g = torch.Generator().manual_seed(seed + run)
        return sample(
            model, shape, method=method, steps=steps, guidance_scale=guidance, cond=cond,
            uncond=uncond, prediction="flow", accelerators=accelerators, generator=g,
            progress=False,
        )  # fmt: skip

    from .hooks import model_calls

    sampling = {"method": method, "steps": steps, "calls": model_calls(method, steps),
                "runs": runs, "batch": batch, "guidance": guidance, "seed": seed,
                "prediction": "flow"}  # fmt: skip
    return CalibrationSetup(model, draw, runs, sampling, dict(options or {}))


def _cmd_calibrate(args: argparse.Namespace, load_checkpoint) -> int:
    from .calibration import CALIBRATORS, run_calibration

    if args.method not in CALIBRATORS:
        raise SystemExit(f"adaptdiff calibrate: --method must be one of {sorted(CALIBRATORS)}")
    if (args.checkpoint is None) == (args.model is None):
        raise SystemExit("adaptdiff calibrate: give exactly one of --checkpoint and --model")
    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint)
    else:
        model = random_dit(args.model, seed=args.seed)
    options = dict(kv.split("=", 1) for kv in args.option)
    setup = calibration_setup(
        model, method=args.sampler, steps=args.steps, runs=args.runs, batch=args.batch,
        guidance=args.guidance, seed=args.seed, options=options,
    )  # fmt: skip
    setup.sampling["model"] = args.checkpoint or args.model
    out = args.out or f"{args.method}.json"
    doc = run_calibration(args.method, setup, out)
    shown = {k: v for k, v in doc.items() if k not in ("format", "version")}
    text = json.dumps(shown)
    print(text if len(text) < 600 else text[:600] + " ...")
    print(f"wrote {out}")
    return 0


def add_calibrate_parser(sub, load_checkpoint) -> None:
    """The ``calibrate`` sub-command; ``load_checkpoint(folder) -> model`` reads ``--checkpoint``
    (the command line passes the digits recipe's loader: recipes sit above accel)."""
    from .calibration import CALIBRATORS

    methods = "; ".join(f"{k}: {v.help}" for k, v in sorted(CALIBRATORS.items()))
    s = sub.add_parser(
        "calibrate",
        help="fit an accelerator's coefficients or search its schedule "
        f"({', '.join(sorted(CALIBRATORS))})",
        description=f"Methods: {methods}",
    )
    s.add_argument("--method", required=True, help=f"one of {sorted(CALIBRATORS)}")
    s.add_argument("--checkpoint", default=None, help="a folder written by `adaptdiff train`")
    s.add_argument("--model", default=None, help="a DiT config name with random weights")
    s.add_argument("--sampler", default="euler", choices=["euler", "heun", "dpmpp_2m", "ddim"])
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--runs", type=int, default=4, help="calibration sampling runs")
    s.add_argument("--batch", type=int, default=2, help="samples per run")
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="JSON path (default <method>.json)")
    s.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a method option, e.g. degree=3 for teacache",
    )  # fmt: skip
    s.set_defaults(fn=functools.partial(_cmd_calibrate, load_checkpoint=load_checkpoint))
