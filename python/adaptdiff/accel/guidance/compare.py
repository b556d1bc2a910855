"""The searched guidance policy against adaptive guidance's cosine rule at equal evaluations.

``python -m adaptdiff.accel.guidance.compare --out FILE.json [--quick]``

For each seed and each AG threshold gamma-bar: AG (:class:`~.adaptive.AdaptiveGuidance`) runs on
the evaluation noise and uses some network evaluations per sample, E; the policy search
(:func:`~.policy.search_guidance_policy`) then gets the budget floor(E) (so the policy never
uses more than AG), LinearAG coefficients fitted on full-CFG runs of *calibration* noise, and a
fitness that is the PSNR against full CFG on that calibration noise; it runs twice, over
cfg/cond/linear and over cfg/cond alone (where the steps that keep CFG are all it chooses).
The policies found, AG and
the truncation rule at the same budget (``cfg`` on the first k steps, then ``cond``: the shape
AG's rule takes when every sample switches at the same step) are scored on the evaluation noise
by their PSNR against full CFG from the same noise. The model is a random-weight DiT (see
:func:`_model`): a comparison of how faithfully each reproduces CFG, not of image quality.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from ...samplers import sample
from .adaptive import AdaptiveGuidance, TrajectoryRecorder, fit_linear_ag
from .policy import GuidancePolicy, policy_evaluations, psnr_fitness, search_guidance_policy

__all__ = ["compare", "main"]


def _model(name: str, label_scale: float):
    """A random-weight DiT whose blocks carry real weight (adaLN gates N(0, 0.5^2)) and whose
    label embedding is scaled by ``label_scale``, so that the conditional and unconditional
    predictions differ by tens of percent (the initialisation's 0.02 makes them differ by ~1 %,
    where every guidance shortcut looks exact)."""
    from ..cli import random_dit

    model = random_dit(name, seed=0, gate_std=0.5)
    with torch.no_grad():
        model.y_embedder.embedding_table.weight.mul_(label_scale)
    return model


def compare(
    *,
    model_name: str = "DiT-tiny/2",
    label_scale: float = 10.0,
    steps: int = 16,
    guidance: float = 2.0,
    batch: int = 8,
    thresholds: tuple[float, ...] = (0.95, 0.97),
    seeds: tuple[int, ...] = (0, 1, 2),
    trials: int = 40,
    calib_runs: int = 1,
    history: int = 1,
    log=print,
) -> dict:
    """Run the comparison and return its record (``rows``: one per seed, threshold, method)."""
    model = _model(model_name, label_scale)
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    labels = torch.arange(batch) % cfg.num_classes
    cond, uncond = {"y": labels}, {"y": torch.full_like(labels, model.null_label)}

    def draw(noise_seed: int, accelerators) -> tuple[torch.Tensor, dict]:
        return sample(
            model, shape, method="euler", steps=steps, guidance_scale=guidance, cond=cond,
            uncond=uncond, prediction="flow", accelerators=accelerators, progress=False,
            generator=torch.Generator().manual_seed(noise_seed), return_info=True,
        )  # fmt: skip

    rows, start = [], time.perf_counter()
    for seed in seeds:
        calib = [10_000 + 100 * seed + r for r in range(calib_runs)]  # never the eval noise
        refs, trajectories = [], []
        for s in calib:
            rec = TrajectoryRecorder()
            refs.append(draw(s, [rec])[0])
            trajectories.append((rec.cond, rec.uncond))
        coefficients = fit_linear_ag(trajectories, history)
        calib_ref = torch.cat(refs)
        data_range = float(calib_ref.max() - calib_ref.min())

        def run(accelerators, calib=calib):
            return torch.cat([draw(s, accelerators)[0] for s in calib])

        fitness = psnr_fitness(
            run, calib_ref, data_range=data_range, coefficients=coefficients, history=history
        )
        ref, ref_info = draw(seed, [])

        def score(x, info, method, setting, threshold, ref=ref, seed=seed, dr=data_range, **extra):
            mse = (x.double() - ref.double()).square().mean().item()  # pooled: a sample equal
            value = math.inf if mse == 0 else 10 * math.log10(dr**2 / mse)  # to CFG has inf
            rows.append({
                "seed": seed, "threshold": threshold, "method": method, "setting": setting,
                "evals": info["nfe_per_sample"], "psnr": value, **extra,
            })  # fmt: skip
            if log is not None:
                log(f"seed {seed} {method:<10} {setting:<34} evals {info['nfe_per_sample']:5.2f} "
                    f"PSNR {value:6.2f} dB ({time.perf_counter() - start:.0f} s)")  # fmt: skip

        for threshold in thresholds:
            x, info = draw(seed, [AdaptiveGuidance(threshold)])
            score(x, info, "AG", f"cos >= {threshold}", threshold)
            budget = max(steps, math.floor(info["nfe_per_sample"] + 1e-9))
            k = budget - steps
            trunc = ("cfg",) * k + ("cond",) * (steps - k)
            x, info = draw(seed, [GuidancePolicy(trunc)])
            score(x, info, "truncation", f"cfg on the first {k} steps", threshold)
            found = search_guidance_policy(
                fitness, steps, budget, linear_steps=coefficients, trials=trials, seed=seed,
            )  # fmt: skip
            policy = found.policy
            x, info = draw(seed, [GuidancePolicy(policy, coefficients=coefficients)])
            if not info["nfe_per_sample"] == policy_evaluations(policy) <= budget:
                raise RuntimeError(f"compare: policy {policy} ran {info['nfe_per_sample']} evals")
            short = "".join({"cfg": "C", "cond": "c", "linear": "L"}[c] for c in policy)
            score(x, info, "searched", f"budget {budget}: {short}", threshold,
                  policy=list(policy), search_psnr=found.fitness)  # fmt: skip
            # the same search without LinearAG's estimate: where CFG goes, and nothing else
            found = search_guidance_policy(
                fitness, steps, budget, choices=("cfg", "cond"), trials=trials, seed=seed
            )
            x, info = draw(seed, [GuidancePolicy(found.policy)])
            short = "".join({"cfg": "C", "cond": "c"}[c] for c in found.policy)
            score(x, info, "searched-cond", f"budget {budget}: {short}", threshold,
                  policy=list(found.policy), search_psnr=found.fitness)  # fmt: skip
        if ref_info["nfe_per_sample"] != 2 * steps:
            raise RuntimeError("compare: full CFG did not evaluate both branches at every step")
    return {
        "benchmark": "guidance-policy",
        "model": f"{model_name} random weights (adaLN gates N(0, 0.5^2), label embedding x"
        f"{label_scale})",
        "weights": "random",
        "sampling": {
            "method": "euler",
            "prediction": "flow",
            "steps": steps,
            "guidance": guidance,
            "batch": batch,
        },  # fmt: skip
        "search": {
            "algorithm": "evolutionary (mu + lambda), adaptdiff.accel.guidance.policy",
            "trials": trials,
            "calib_runs": calib_runs,
            "history": history,
            "fitness": "PSNR against full CFG on calibration noise",
        },  # fmt: skip
        "psnr": "PSNR against full CFG from the same noise, 10 log10(range^2 / MSE) with the "
        "MSE over all samples pooled; range: that of the calibration CFG samples",
        "seeds": list(seeds),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, per (threshold, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["threshold"], r["method"]), []).append(r)
    out = []
    for (threshold, method), rs in groups.items():

        def ms(key, rs=rs):
            v = [r[key] for r in rs]
            return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0

        out.append({"threshold": threshold, "method": method, "n": len(rs),
                    "evals": ms("evals"), "psnr": ms("psnr")})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON record to write")
    p.add_argument("--quick", action="store_true", help="one seed, one threshold, 8 trials")
    p.add_argument("--trials", type=int, default=40)
    args = p.parse_args(argv)
    kw = {"seeds": (0,), "thresholds": (0.95,), "trials": 8} if args.quick else {}
    record = compare(**{"trials": args.trials, **kw})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    for s in summarize(record["rows"]):
        (e, es), (q, qs) = s["evals"], s["psnr"]
        print(
            f"{s['threshold']} {s['method']:<10} evals {e:.2f} ± {es:.2f}  PSNR {q:.2f} ± {qs:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
