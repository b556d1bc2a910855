"""Regenerate the benchmark tables of README.md and docs/*.md from the recorded results.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a Markdown file and is
rebuilt from ``benchmarks/results/*.jsonl`` and the demo's ``*.json``, so that a rerun of a
benchmark that rewrites its record updates the docs. The prose around a table (the machine, the
command, what it shows) is written by hand.

    python scripts/benchmark_tables.py           # rewrite the tables in place
    python scripts/benchmark_tables.py --check   # exit 1 when a file is stale
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)

# The recorded runs the tables read (one file per run: a rerun replaces its file).
KERNELS_CPU = "cpu-2core-epyc-1thread-2026-11-26.jsonl"
KERNELS_H100 = "cuda-h100-2026-11-26.jsonl"
BLOCK_ATTENTION_CPU = "block_attention-cpu-1thread-2026-11-26.jsonl"
BLOCK_ATTENTION_H100 = "block_attention-cuda-h100-2026-11-26.jsonl"
MODELS_H100 = "models-cuda-h100-2026-11-26.jsonl"
ADAPTERS_H100 = "adapters-cuda-h100-2026-11-26.jsonl"
# `adaptdiff bench adapters --methods lora sara --interleave`, before and after SaRA's GEMM paths
ADAPTERS_SARA_CPU = "adapters-sara-cpu-2core-xeon-2026-12-03.jsonl"
ACCEL_SWEEP = "accel-sweep-cpu-2core-epyc-2026-11-26.jsonl"
ACCEL_DIFFUSERS_RUN1 = "accel-diffusers-sweep-run1-cpu-2core-epyc-2026-11-26.jsonl"
ACCEL_CPU_FIRST = "accel-cpu-2core-epyc-2026-11-26.jsonl"
ACCEL_H100 = "accel-cuda-h100-2026-11-26.jsonl"
# `adaptdiff bench accel --models pipelines`: the methods inside the diffusers pipelines' loops
ACCEL_PIPELINES = "accel-pipelines-cpu-2core-xeon-2026-12-03.jsonl"
# the same at 1024 image tokens (`--pipeline-size medium --pipeline-methods RAS`): RAS's CPU target
ACCEL_PIPELINES_MEDIUM = "accel-pipelines-medium-cpu-2core-xeon-2026-12-03.jsonl"
# `benchmarks/ras_step.py --before 5fa394a`: RAS vs dense, before and after the sync-free RAS step
ACCEL_RAS_CPU = "accel-ras-cpu-2core-xeon-2026-12-03.jsonl"
# `adaptdiff bench moe_layer --passes both --impls adaptdiff,dit-moe-mask`, 1 and 2 threads
MOE_LAYER_CPU = "moe-cpu-2core-xeon-2026-12-03.jsonl"
# the same at 2 threads on the idle machine (wall clock, 5 rounds): the two-thread figures
MOE_LAYER_CPU_IDLE = "moe-cpu-2core-xeon-idle-2threads-2026-12-03.jsonl"
# `adaptdiff demo --moe`: mean ± std over 3 noise seeds of one trained dense and one MoE model
DEMO = "demo-moe-seeds-cpu-2core-xeon-2026-12-03.json"
# `adaptdiff demo --seeds 3 --noise-seeds 1`: 3 trained models, noise seed 0 each
DEMO_TRAINING_SEEDS = "demo-training-seeds-cpu-2core-xeon-2026-12-03.json"
# `adaptdiff bench accel --models digits --seeds 3`: the trained digits DiT's quality rows,
# mean ± std over 3 noise seeds
ACCEL_DIGITS_SEEDS = "accel-digits-seeds-cpu-2core-xeon-2026-12-03.jsonl"
ACCEL_LATENT_SEEDS = "accel-latent-seeds-cpu-2core-xeon-2026-12-03.jsonl"
STUDY_ADAPT = "study-adapt-cpu-2core-2026-12-02.json"
# `adaptdiff study hf-convert`: one AR char model SDAR-converted natively and through transformers
STUDY_HF_CONVERT = "study-hf-convert-cpu-2core-2026-12-02.json"
# `adaptdiff study nag`: predictor-guided architecture diffusion against random search
STUDY_NAG = "study-nag-cpu-2core-2026-12-03.json"
# `adaptdiff study control`: ControlNet condition fidelity per condition
STUDY_CONTROL = "study-control-cpu-2core-2026-12-03.json"
# `adaptdiff study ita`: reference-guided inpainting, no reference / last layer / ITAFA / +SRE
STUDY_ITA = "study-ita-cpu-2core-2026-12-03.json"
# the same at 600 steps, 2 seeds (`--seeds 2 --set steps=600`)
STUDY_ITA_LONG = "study-ita-600-steps-cpu-2core-2026-12-03.json"
# `adaptdiff study divcontrol`: multi-condition ControlNet against DivControl
STUDY_DIVCONTROL = "study-divcontrol-cpu-2core-2026-12-03.json"
# `adaptdiff study prune`: a DiT cut by block importance, recovered by fine-tuning or distillation
STUDY_PRUNE = "study-prune-cpu-2core-2026-12-03.json"
# `adaptdiff study dimsum`: DiMSUM against a same-size DiT at equal training steps
STUDY_DIMSUM = "study-dimsum-cpu-2core-2026-12-03.json"
# `adaptdiff study vl`: a vision-language model, AR decoding vs block decoding after SDAR
STUDY_VL = "study-vl-cpu-2core-2026-12-03.json"
# `adaptdiff study afa`: AFA ensembling against each fine-tune and the averages
STUDY_AFA = "study-afa-cpu-2core-2026-12-03.json"
# `adaptdiff study diffscaler`: per-task Affiners against one LoRA / DiffFit per task
STUDY_DIFFSCALER = "study-diffscaler-cpu-2core-2026-12-03.json"
# `adaptdiff study tracerl`: TraceRL on a small block-diffusion LM, accuracy and TPF before/after
STUDY_TRACERL = "study-tracerl-cpu-2core-2026-12-03.json"
# `adaptdiff study policy`: dense vs MoDE diffusion policies, expert caching and BAC
STUDY_POLICY = "study-policy-cpu-2core-2026-12-03.json"
# `adaptdiff study motion`: MotionDirector's debiased temporal loss against the plain MSE
STUDY_MOTION = "study-motion-cpu-2core-2026-12-03.json"
# `adaptdiff study multiconcept`: orthogonal against plain LoRA concepts merged by a sum
STUDY_MULTICONCEPT = "study-multiconcept-cpu-2core-2026-12-03.json"
# `adaptdiff study diffusia`: spiral vs plain encoder-decoder text diffusion vs AR
STUDY_DIFFUSIA = "study-diffusia-cpu-2core-2026-12-03.json"
STUDY_DIFFUSIA_CONSTANT = "study-diffusia-constant-lr-cpu-2core-2026-12-03.json"  # cosine=false
# `adaptdiff study timeseries`: one UniTS model for three tasks against simple baselines
STUDY_TIMESERIES = "study-timeseries-cpu-2core-2026-12-03.json"
STUDY_TIMESERIES_LONG = "study-timeseries-2000-steps-cpu-2core-2026-12-03.json"  # 2000 steps
# `adaptdiff study mdt`: MDT against a same-size DiT, digits-FD per checkpoint and steps-to-FD
STUDY_MDT = "study-mdt-cpu-2core-2026-12-03.json"
# `adaptdiff study dfm`: decomposable flow matching against plain flow matching at equal NFE
STUDY_DFM = "study-dfm-cpu-2core-2026-12-03.json"
STUDY_DFM_LONG = "study-dfm-1200-steps-cpu-2core-2026-12-03.json"  # 1200 steps, one seed
# `adaptdiff study sr`: one-step SR distilled from a multi-step model, routed local/global heads
STUDY_SR = "study-sr-cpu-2core-2026-12-03.json"
# `adaptdiff study ldm`: a latent DiT on a KL autoencoder against a pixel DiT at 32x32
STUDY_LDM = "study-ldm-cpu-2core-2026-12-03.json"
# `adaptdiff study edge`: DiffusionEdge against Sobel and a discriminative network
STUDY_EDGE = "study-edge-cpu-2core-2026-12-03.json"
# python -m adaptdiff.accel.guidance.compare: searched guidance policies against AG's cosine rule
GUIDANCE_POLICY = "guidance-policy-cpu-2core-2026-12-03.json"
# `python benchmarks/text_dit.py --seeds 3`: a text-conditioned DiT's prompt accuracy
TEXT_DIT = "text-dit-cpu-2core-2026-12-03.json"

OPS = ["gather_tokens", "scatter_tokens", "indexed_linear_", "patch_scores", "rel_l1", "cosine"]
OPS += ["lincomb"]
SHAPES = [("DiT-XL/2 256px", "float32"), ("DiT-XL/2 256px", "bfloat16")]
SHAPES += [("SD3 1024px", "float32"), ("SD3 1024px", "bfloat16")]
MOE_SHAPES = {
    "DiT-MoE-S B=8": "DiT-MoE-S B=8 T=2048 D=384 E=8",
    "DiT-MoE-XL B=8": "DiT-MoE-XL B=8 T=2048 D=1152 E=64",
    "DiT-MoE-S B=64": "DiT-MoE-S B=64 T=16384 D=384 E=64",
    "DiT-MoE-XL B=64": "DiT-MoE-XL B=64 T=16384 D=1152 E=8",
    "DiT-MoE-S B=256": "DiT-MoE-S B=256 T=65536 D=384 E=64",
}


def records(name: str) -> list[dict]:
    with open(RESULTS / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def times(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}×"


def span(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}×"


def op_ratios(name: str) -> dict[tuple, float]:
    """(op, variant, label, dtype) -> reference time / kernel time."""
    return {
        (r["op"], r["variant"], r["label"], r["dtype"]): r["ratio"]
        for r in records(name)
        if r.get("op") and r["impl"] == "kernel" and r["status"] == "ok"
    }


def op_rows(ratios: dict[tuple, float]) -> list[tuple[str, str]]:
    """(op, variant) pairs of the copy/reduction ops, in the contract's order."""
    seen = {(op, variant) for op, variant, _, _ in ratios if op in OPS}
    return sorted(seen, key=lambda ov: (OPS.index(ov[0]), ov[1]))


def op_label(op: str, variant: str) -> str:
    return f"`{op}`" + (f" ({variant})" if variant else "")


def kernels(name: str) -> str:
    ratios = op_ratios(name)
    header = ["op", "DiT-XL/2 fp32", "DiT-XL/2 bf16", "SD3-1024 fp32", "SD3-1024 bf16"]
    rows = [
        [op_label(op, v)] + [times(ratios.get((op, v, *shape))) for shape in SHAPES]
        for op, v in op_rows(ratios)
    ]
    return table(header, rows)


def kernels_headline() -> str:
    cpu, gpu = op_ratios(KERNELS_CPU), op_ratios(KERNELS_H100)
    header = ["op (SD3-1024, bf16)", "CPU, 1 thread", "H100"]
    rows = [
        [op_label(op, v), times(cpu.get((op, v, *SHAPES[3]))), times(gpu.get((op, v, *SHAPES[3])))]
        for op, v in op_rows(cpu)
        if (op, v) not in HEADLINE_SKIP
    ]
    return table(header, rows)


HEADLINE_SKIP = {("patch_scores", "l2"), ("lincomb", "n=4")}


def moe_dispatch(name: str) -> str:
    ratios = op_ratios(name)
    header = ["shape (K=2)", "`moe_permute` fp32", "bf16", "`moe_unpermute` fp32", "bf16"]
    rows = []
    for label, shape in MOE_SHAPES.items():
        cells = [
            times(ratios.get((op, "", label, dt)))
            for op in ("moe_permute", "moe_unpermute")
            for dt in ("float32", "bfloat16")
        ]
        rows.append([shape, *cells])
    return table(header, rows)


def moe_layer(name: str) -> str:
    rows = [r for r in records(name) if r.get("benchmark") == "moe"]
    out = []
    for r in rows:
        if r["impl"] != "adaptdiff":
            continue
        same = [s for s in rows if (s["T"], s["E"], s["dtype"]) == (r["T"], r["E"], r["dtype"])]
        vs = {s["impl"]: s["vs_adaptdiff"] for s in same}
        out.append(
            [
                f"{r['T']}, {r['E']}",
                r["dtype"],
                f"{r['tflops']:.2f}",
                f"{vs['dit-moe-mask']:.2f}×",
                f"{vs['gshard-capacity']:.2f}×",
            ]
        )
    header = ["T, E", "dtype", "adaptdiff TFLOP/s", "vs DiT-MoE mask loop", "vs GShard capacity"]
    return table(header, out)


def moe_layer_passes(name: str) -> str:
    """adaptdiff against the DiT-MoE mask loop per thread count, pass (forward under no_grad,
    or forward + backward) and shape, from one ``bench moe_layer --passes both`` record."""
    rows = [r for r in records(name) if r.get("benchmark") == "moe"]
    mask = {
        (r["threads"], r["pass"], r["T"], r["E"]): r for r in rows if r["impl"] == "dit-moe-mask"
    }
    out = []
    for r in rows:
        if r["impl"] != "adaptdiff":
            continue
        m = mask[(r["threads"], r["pass"], r["T"], r["E"])]
        out.append(
            [
                str(r["threads"]),
                r["pass"],
                f"{r['T']}, {r['E']}",
                f"{r['median_us'] / 1e3:.0f}",
                f"{m['median_us'] / 1e3:.0f}",
                f"{m['vs_adaptdiff']:.2f}×",
            ]
        )
    header = ["threads", "pass", "T, E", "adaptdiff ms", "DiT-MoE mask loop ms", "mask / adaptdiff"]
    return table(header, out)


def sampling_h100() -> str:
    rows = [r for r in records(MODELS_H100) if r.get("benchmark") == "sampling"]
    header = ["model", "latent", "solver", "steps", "NFE", "ms/step", "images/s"]
    return table(
        header,
        [
            [
                r["model"],
                "×".join(map(str, r["latent"])),
                r["method"],
                str(r["steps"]),
                str(r["nfe"]),
                f"{r['ms_per_step']:.2f}",
                f"{r['images_per_s']:.1f}",
            ]
            for r in rows
        ],
    )


def parse_attention_variant(variant: str) -> tuple[str, str, str]:
    layout, bs, mode = variant.split()
    return layout, bs.removeprefix("bs="), mode


def block_attention(name: str, shapes: set[tuple[str, str, str]] | None = None) -> str:
    """Kernel vs SDPA with a dense mask, forward and forward + backward per shape."""
    kern = [r for r in records(name) if r["impl"] == "kernel"]
    cells: dict[tuple, dict] = {}
    for r in kern:
        layout, bs, mode = parse_attention_variant(r["variant"])
        if shapes is not None and (layout, r["label"], bs) not in shapes:
            continue
        cells.setdefault((layout, r["label"], bs, r["dtype"]), {})[mode] = r
    header = ["layout", "shape", "bs", "dtype", "forward", "forward + backward", "TFLOP/s (fwd)"]
    rows = []
    for (layout, label, bs, dtype), modes in cells.items():
        fwd, both = modes.get("fwd"), modes.get("fwd+bwd")
        training = layout in ("bd3", "context_causal")
        rows.append(
            [
                f"`{layout}`",
                ("2×" if training else "") + label,
                bs,
                dtype,
                f"{fwd['ratio']:.2f}×" if fwd else "",
                f"{both['ratio']:.2f}×" if both else "",
                f"{fwd['tflops']:.3g}" if fwd else "",
            ]
        )
    return table(header, rows)


def slow_on_h100() -> str:
    kern = [r for r in records(KERNELS_H100) if r.get("op") in ("sara_linear", "sampled_wgrad")]
    header = ["op", "variant", "layer", "N", "dtype", "vs reference", "kernel µs"]
    rows = [
        [
            f"`{r['op']}`",
            r["variant"],
            r["label"],
            str(r["shape"]["N"]),
            r["dtype"],
            f"{r['ratio']:.2f}×",
            f"{r['median_us']:.0f}",
        ]
        for r in kern
        if r["impl"] == "kernel"
    ]
    return table(header, rows)


def adapters_h100() -> str:
    header = ["method", "trainable", "%", "peak added MiB", "ms/step", "memory vs full"]
    rows = [
        [
            r["method"],
            f"{r['trainable']:,}",
            f"{100 * r['trainable'] / r['total']:.2f}%",
            f"{r['peak_added_mib']:.0f}",
            f"{r['median_ms']:.1f}",
            f"{r['memory_vs_full']:.2f}",
        ]
        for r in records(ADAPTERS_H100)
    ]
    return table(header, rows)


def adapters_sara_cpu() -> str:
    header = ["code", "method", "trainable", "peak added MiB", "ms/step", "step vs LoRA"]
    rows = [
        [
            r["tag"],
            r["method"],
            f"{r['trainable']:,}",
            f"{r['peak_added_mib']:.0f}",
            f"{r['median_ms']:.0f}",
            f"{r['vs_lora']:.2f}×",
        ]
        for r in records(ADAPTERS_SARA_CPU)
    ]
    return table(header, rows)


def number(x: float | None, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def accel_row(r: dict) -> list[str]:
    exact = r["method"] == "exact"
    return [
        r["model"],
        r["method"] + (" *" if r["pareto"] and not exact else ""),
        r["setting"],
        f"{r['seconds']:.2f}",
        f"{r['speedup']:.2f}x",
        str(r["nfe"]),
        "" if math.isnan(r["compute"]) else f"{100 * r['compute']:.0f}%",
        "exact" if exact else f"{r['psnr']:.1f}",
        f"{r['ssim']:.3f}",
        number(r["fd"], ".2f"),
        "" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
    ]


ACCEL_HEADER = ["model", "method", "setting", "s", "speedup", "NFE", "compute", "PSNR dB", "SSIM"]
ACCEL_HEADER += ["digits-FD", "acc"]


def accel(name: str, models: Callable[[str], bool] = lambda m: True) -> str:
    rows = [r for r in records(name) if "method" in r and models(r["model"])]
    return table(ACCEL_HEADER, [accel_row(r) for r in rows])


def pm(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """A recorded row's ``key`` as mean ± std over its noise seeds (``r["std"]``), or just the
    value where it has no spread."""
    value = r.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    std = (r.get("std") or {}).get(key)
    text, spread = format(scale * value, fmt), format(scale * (std or 0.0), fmt)
    return text if float(spread) == 0 else f"{text} ± {spread}"  # no "± 0" after rounding


ACCEL_SEEDS_HEADER = ["method", "setting", "CPU s", "speedup", "NFE", "compute", "PSNR dB"]
ACCEL_SEEDS_HEADER += ["SSIM", "digits-FD", "acc"]


def accel_seeds(name: str) -> str:
    """The trained digits DiT's rows, every seeded column as mean ± std over the noise seeds."""
    rows = [r for r in records(name) if r.get("benchmark") == "accel" and "method" in r]
    out = []
    for r in rows:
        exact = r["method"] == "exact"
        out.append([
            r["method"] + (" *" if r["pareto"] and not exact else ""), r["setting"],
            pm(r, "seconds", ".2f"), pm(r, "speedup", ".2f") + "×", pm(r, "nfe", ".3g"),
            pm(r, "compute", ".0f", 100) + " %", "exact" if exact else pm(r, "psnr", ".1f"),
            pm(r, "ssim", ".3f"), pm(r, "fd", ".2f"), pm(r, "accuracy", ".1f", 100) + " %",
        ])  # fmt: skip
    return table(ACCEL_SEEDS_HEADER, out)


def accel_headline() -> str:
    """A few rows of the benchmark on its two trained models (the pixel digits DiT and the
    latent DiT), mean ± std over the noise seeds; FD of each model's own images (16 or 32 px)."""
    picks = [
        ("exact", "euler 28"),
        ("RAS", "ratio 0.5, resets 12,20"),
        ("FirstBlockCache", "threshold 0.08"),
        ("TeaCache", "threshold 0.1, raw indicator"),
        ("TaylorSeer", "interval 3, order 1"),
        ("AG", "cos >= 0.99"),
    ]
    runs = [records(ACCEL_DIGITS_SEEDS), records(ACCEL_LATENT_SEEDS)]
    found = [{(r.get("method"), r.get("setting")): r for r in run if "method" in r} for run in runs]

    def cells(r):
        return [
            pm(r, "speedup", ".2f") + "×",
            "exact" if r["method"] == "exact" else pm(r, "psnr", ".1f"),
            pm(r, "fd", ".1f"),
        ]

    header = ["method", "pixel DiT speedup", "PSNR dB", "FD", "latent DiT speedup", "PSNR dB"]
    header += ["FD"]
    rows = [[f"{m} ({s})", *cells(found[0][m, s]), *cells(found[1][m, s])] for m, s in picks]
    return table(header, rows)


def accel_pipelines(name: str) -> str:
    """Every row of the pipelines run (no digits columns: random weights)."""
    rows = [r for r in records(name) if r.get("benchmark") == "accel" and "method" in r]
    return table(ACCEL_HEADER[:9], [accel_row(r)[:9] for r in rows])


def accel_pipelines_targets(name: str) -> str:
    """Per pipeline: the fastest cache or schedule at >= 30 dB, RAS 0.5, AG's rows saved."""
    rows = [r for r in records(name) if r.get("benchmark") == "accel" and "method" in r]
    caches = ("FirstBlockCache", "TeaCache", "TaylorSeer", "DeepCache-like")
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        good = [r for r in mine if r["method"] in caches and r["psnr"] >= 30.0]
        best = max(good, key=lambda r: r["speedup"], default=None)
        ras = next((r for r in mine if r["method"] == "RAS"), None)
        ag = next((r for r in mine if r["method"] == "AG"), None)
        out.append([
            model.split()[0],
            "none" if best is None else
            f"{best['speedup']:.2f}× ({best['method']} {best['setting']}, {best['psnr']:.1f} dB)",
            "not run" if ras is None else f"{ras['speedup']:.2f}× ({ras['psnr']:.1f} dB)",
            "" if ag is None else f"{100 * (1 - ag['compute']):.0f}%",
        ])  # fmt: skip
    header = ["pipeline", "best cache at >= 30 dB", "RAS ratio 0.5", "AG 0.99: rows saved"]
    return table(header, out)


def first_block_pairs(name: str) -> str:
    """diffusers' and adaptdiff's first-block caches at the same thresholds."""
    rows = [r for r in records(name) if r.get("method", "").endswith("FirstBlockCache")]
    rows = [r for r in rows if r["model"].startswith("diffusers")]
    by = {(r["method"], r["setting"]): r for r in rows}
    thresholds = sorted({r["setting"] for r in rows}, key=lambda s: float(s.split()[-1]))

    def cell(r: dict) -> str:
        if r["psnr"] >= 99:
            return f"{r['speedup']:.2f}×, {100 * r['compute']:.0f} %, never skips"
        return f"{r['speedup']:.2f}×, {100 * r['compute']:.0f} %, {r['psnr']:.1f} dB"

    header = ["threshold", "diffusers FirstBlockCache", "adaptdiff FirstBlockCache"]
    return table(
        header,
        [
            [
                t.split()[-1],
                cell(by["diffusers FirstBlockCache", t]),
                cell(by["FirstBlockCache", t]),
            ]
            for t in thresholds
        ],
    )


def matched(name: str, on: str) -> str:
    rows = [r for r in records(name) if r.get("matched_on") == on]
    methods = list(rows[0]["psnr"])
    at = "speedup" if on == "speedup" else "compute saved"
    header = [at, "diffusers FBC dB", *methods, "best adaptdiff", "verdict"]
    out = []
    for r in rows:
        delta = r["best_psnr"] - r["reference_psnr"]
        verdict = (
            "equal"
            if abs(delta) < 0.1
            else (f"adaptdiff +{delta:.1f} dB" if delta > 0 else f"diffusers +{-delta:.1f} dB")
        )
        point = f"{r['at']:.2f}×" if on == "speedup" else f"{100 * r['at']:.0f} %"
        out.append(
            [
                point,
                f"{r['reference_psnr']:.1f}",
                *[number(r["psnr"][m], ".1f") for m in methods],
                f"{r['best']} {r['best_psnr']:.1f}",
                verdict,
            ]
        )
    return table(header, out)


def accel_h100() -> str:
    rows = [r for r in records(ACCEL_H100) if r["method"] != "exact"]
    keys = list(
        dict.fromkeys((r["model"].split(" random")[0], r["method"], r["setting"]) for r in rows)
    )
    sizes = {"32x32x4": "256 px (256 tokens)", "64x64x4": "512 px (1024 tokens)"}
    header = ["model", "method", "setting", *sizes.values()]
    out = []
    for model, method, setting in keys:
        cells = []
        for size in sizes:
            hit = [
                r
                for r in rows
                if (r["model"], r["method"], r["setting"])
                == (f"{model} random, {size}", method, setting)
            ]
            psnr = (
                ""
                if not hit
                else "identical"
                if hit[0]["psnr"] >= 99
                else f"{hit[0]['psnr']:.1f} dB"
            )
            cells.append(f"{hit[0]['speedup']:.2f}× at {psnr}" if hit else "")
        out.append([model, method, setting, *cells])
    return table(header, out)


def demo(
    rows_wanted: Callable[[str], bool] = lambda name: True, record: str = DEMO, wall: bool = True
) -> str:
    """The demo's rows: mean ± std over its runs where the record has them (``summary``);
    ``wall=False`` leaves the wall times out (the README's rows: the record's run shared its
    machine, so its times are not comparable with other runs')."""
    doc = json.loads((RESULTS / record).read_text())
    summary = doc.get("summary", {})

    def cell(name: str, r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        stat = summary.get(name, {}).get(key)
        std = stat and stat["std"]
        text = format(scale * r[key], fmt)
        return text if not std else f"{text} ± {format(scale * std, fmt)}"

    header = ["sampler", "steps", "NFE", "wall s", "digits-FD", "class accuracy"]
    if not wall:
        header.remove("wall s")
    out = []
    for r in doc["rows"]:
        if not rows_wanted(r["name"]):
            continue
        sampler = r["name"].rsplit(" ", 1)[0].replace("RAS 0.5 ", "RAS 0.5, ")
        out.append(
            [
                sampler,
                str(r["steps"]),
                str(r["nfe"]),
                *([f"{r['seconds']:.2f}"] if wall else []),
                cell(r["name"], r, "fd", ".2f"),
                cell(r["name"], r, "accuracy", ".1f", 100) + " %",
            ]
        )
    floor = f"{100 * doc['classifier_test_accuracy']:.1f} % (classifier, held-out)"
    real_std = doc.get("reference_fd_std")
    real = f"{doc['reference_fd']:.2f}" + (f" ± {real_std:.2f}" if real_std else "")
    blanks = ["", "", ""] if wall else ["", ""]
    out.append([f"{doc['num_samples']} real training digits", *blanks, real, floor])
    return table(header, out)


HEADLINE_DEMO = {"euler 16", "heun 4", "dpmpp_2m 8", "RAS 0.5 euler 16", "MoE dpmpp_2m 8"}


def study(name: str, record: str) -> str:
    """A study's table (mean ± std over seeds) from its recorded ``results.json``, laid out
    by the study's own columns."""
    from adaptdiff.studies import Stat, get_study
    from adaptdiff.studies.runner import format_table

    saved = json.loads((RESULTS / record).read_text())
    summary = {
        row: {metric: Stat(**stat) for metric, stat in metrics.items()}
        for row, metrics in saved["summary"].items()
    }
    return "```\n" + format_table(get_study(name).columns, summary) + "\n```\n"


def text_dit(record: str) -> str:
    """Prompt accuracy of a text-conditioned DiT without and with guidance: mean ± std."""
    doc = json.loads((RESULTS / record).read_text())
    names = {
        "cond": "prompt alone (no guidance)",
        "cfg": f"CFG {doc['config']['guidance']:g} against the empty prompt",
        "cfg_negative": f'CFG {doc["config"]["guidance"]:g} against "a <digit + 1>"',
    }
    rows = []
    for key, name in names.items():
        s = doc["summary"][key]
        rows.append([name, f"{s['mean']:.3f} ± {s['std']:.3f}"])
    seeds = len(doc["seeds"])
    return table(["sampling", f"prompt accuracy ({seeds} seeds)"], rows)


def guidance_policy(record: str) -> str:
    """AG's cosine rule, the truncation rule and the searched policy at AG's evaluations:
    mean ± standard deviation over the recorded seeds."""
    doc = json.loads((RESULTS / record).read_text())
    groups: dict[tuple, list[dict]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["threshold"], r["method"]), []).append(r)

    def ms(rs: list[dict], key: str, fmt: str) -> str:
        v = [r[key] for r in rs]
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        return f"{mean:{fmt}} ± {std:{fmt}}"

    names = {"AG": "AG (cosine rule)", "truncation": "CFG on the first k steps, then cond",
             "searched": "searched policy (cfg/cond/linear)",
             "searched-cond": "searched policy (cfg/cond only)"}  # fmt: skip
    header = ["AG γ̄", "method", "seeds", "evals/sample", "PSNR vs CFG (dB)", "policies found"]
    rows = []
    for (threshold, method), rs in groups.items():
        found = ", ".join(f"`{r['setting'].split(': ')[1]}`" for r in rs if ": " in r["setting"])
        rows.append([f"{threshold}", names.get(method, method), str(len(rs)),
                     ms(rs, "evals", ".2f"), ms(rs, "psnr", ".2f"), found])  # fmt: skip
    return table(header, rows)


TABLES: dict[str, Callable[[], str]] = {
    "demo": demo,
    "demo-headline": lambda: demo(lambda name: name in HEADLINE_DEMO, wall=False),
    "demo-training-seeds": lambda: demo(record=DEMO_TRAINING_SEEDS),
    "accel-digits-seeds": lambda: accel_seeds(ACCEL_DIGITS_SEEDS),
    "accel-latent-seeds": lambda: accel_seeds(ACCEL_LATENT_SEEDS),
    "kernels-cpu": lambda: kernels(KERNELS_CPU),
    "kernels-h100": lambda: kernels(KERNELS_H100),
    "kernels-headline": kernels_headline,
    "moe-dispatch-cpu": lambda: moe_dispatch(KERNELS_CPU),
    "moe-dispatch-h100": lambda: moe_dispatch(KERNELS_H100),
    "moe-layer-cpu": lambda: moe_layer(KERNELS_CPU),
    "moe-layer-h100": lambda: moe_layer(MODELS_H100),
    "moe-layer-cpu-passes": lambda: moe_layer_passes(MOE_LAYER_CPU),
    "moe-layer-cpu-idle": lambda: moe_layer_passes(MOE_LAYER_CPU_IDLE),
    "sampling-h100": sampling_h100,
    "block-attention-cpu": lambda: block_attention(BLOCK_ATTENTION_CPU),
    "block-attention-headline": lambda: block_attention(
        BLOCK_ATTENTION_CPU, {("block_causal", "L=2048 Dh=64", "16"), ("bd3", "L=1024 Dh=64", "16")}
    ),
    "block-attention-h100": lambda: block_attention(BLOCK_ATTENTION_H100),
    "sara-h100": slow_on_h100,
    "adapters-h100": adapters_h100,
    "adapters-sara-cpu": adapters_sara_cpu,
    "accel-sweep": lambda: accel(ACCEL_SWEEP, lambda m: not m.startswith("diffusers")),
    "accel-sweep-diffusers": lambda: accel(ACCEL_SWEEP, lambda m: m.startswith("diffusers")),
    "accel-headline": accel_headline,
    "accel-first-block": lambda: first_block_pairs(ACCEL_SWEEP),
    "accel-matched-speedup": lambda: matched(ACCEL_SWEEP, "speedup"),
    "accel-matched-compute": lambda: matched(ACCEL_SWEEP, "saved"),
    "accel-diffusers-run1": lambda: accel(ACCEL_DIFFUSERS_RUN1),
    "accel-cpu-first": lambda: accel(ACCEL_CPU_FIRST),
    "accel-h100": accel_h100,
    "accel-pipelines": lambda: accel_pipelines(ACCEL_PIPELINES),
    "accel-pipelines-targets": lambda: accel_pipelines_targets(ACCEL_PIPELINES),
    "accel-pipelines-medium": lambda: accel_pipelines(ACCEL_PIPELINES_MEDIUM),
    "study-adapt": lambda: study("adapt", STUDY_ADAPT),
    "study-hf-convert": lambda: study("hf-convert", STUDY_HF_CONVERT),
    "study-nag": lambda: study("nag", STUDY_NAG),
    "study-control": lambda: study("control", STUDY_CONTROL),
    "study-divcontrol": lambda: study("divcontrol", STUDY_DIVCONTROL),
    "study-prune": lambda: study("prune", STUDY_PRUNE),
    "study-dimsum": lambda: study("dimsum", STUDY_DIMSUM),
    "study-vl": lambda: study("vl", STUDY_VL),
    "study-afa": lambda: study("afa", STUDY_AFA),
    "study-diffscaler": lambda: study("diffscaler", STUDY_DIFFSCALER),
    "study-tracerl": lambda: study("tracerl", STUDY_TRACERL),
    "study-policy": lambda: study("policy", STUDY_POLICY),
    "study-motion": lambda: study("motion", STUDY_MOTION),
    "study-multiconcept": lambda: study("multiconcept", STUDY_MULTICONCEPT),
    "study-diffusia": lambda: study("diffusia", STUDY_DIFFUSIA),
    "study-diffusia-constant-lr": lambda: study("diffusia", STUDY_DIFFUSIA_CONSTANT),
    "study-timeseries": lambda: study("timeseries", STUDY_TIMESERIES),
    "study-timeseries-2000-steps": lambda: study("timeseries", STUDY_TIMESERIES_LONG),
    "study-mdt": lambda: study("mdt", STUDY_MDT),
    "study-dfm": lambda: study("dfm", STUDY_DFM),
    "study-dfm-1200-steps": lambda: study("dfm", STUDY_DFM_LONG),
    "study-sr": lambda: study("sr", STUDY_SR),
    "study-ldm": lambda: study("ldm", STUDY_LDM),
    "study-edge": lambda: study("edge", STUDY_EDGE),
    "study-ita": lambda: study("ita", STUDY_ITA),
    "study-ita-600-steps": lambda: study("ita", STUDY_ITA_LONG),
    "guidance-policy": lambda: guidance_policy(GUIDANCE_POLICY),
    "text-dit": lambda: text_dit(TEXT_DIT),
    "accel-ras-cpu": lambda: table(
        ["tokens", "RAS step", "speedup (CPU time)", "speedup (wall)", "token-weighted bound"],
        [
            [
                str(r["tokens"]),
                "after" if r["impl"] == "ras" else r["impl"].replace("ras at", "before: git"),
                f"{r['speedup_cpu_time']:.2f}×",
                f"{r['speedup_wall']:.2f}×",
                f"{r['bound']:.2f}×",
            ]
            for r in records(ACCEL_RAS_CPU)
        ],
    ),
}


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)

    return MARKER.sub(fill, text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a table is stale")
    args = p.parse_args(argv)
    stale = []
    for path in documents():
        old = path.read_text()
        new = render(old)
        if new != old:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    verb = "stale" if args.check else "rewrote"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
