"""One fine-tuning step of a DiT under each adaptation method: peak memory, step time, trainable
parameters, in one run.

``adaptdiff bench adapters [--quick] [--device cpu|cuda] [--json PATH]
[--threads N] [--clock wall|cpu] [--steps N] [--no-isolate] [--interleave] [--tag T]``

Model: DiT-B/2 on 256 px latents (``[B, 4, 32, 32]``, 256 tokens, 1000 classes) on the CPU,
DiT-XL/2 on CUDA; ``--quick`` uses DiT-S/8 (``[2, 4, 32, 32]``). A step is forward, the flow
loss, backward and ``AdamW.step`` over the trainable parameters. Methods:

- ``full``: every parameter;
- ``lora``: adaptdiff's LoRA, r=16, alpha=16, on ``qkv, proj, fc1, fc2``;
- ``peft-lora``: PEFT's ``LoraConfig(r=16, lora_alpha=16)`` on the same modules (if installed);
- ``sara``: SaRA at 10% of the weights (if :mod:`adaptdiff.adapters.sara` exists);
- ``difffit``: biases, class embedding, per-block gammas;
- ``fera``: 3 LoRA experts of r=4 on the same modules, frequency router, FECL (the extra no-grad
  base forward included).

Memory: every method runs in a fresh process (unless ``--no-isolate``) that builds the model,
then measures what the steps add: on the CPU the peak resident set size during the steps minus
the RSS before them (the kernel's peak counter is reset through ``/proc/self/clear_refs``), on
CUDA ``max_memory_allocated`` minus the allocation before them. Both include gradients, optimizer
state and the activations kept for backward. Step time: the median over ``--steps`` timed steps
after one warm-up step, by the wall clock or (``--clock cpu``, with one thread) process CPU time.
``--interleave`` (CPU, for a loaded machine): all methods are built in this one process and
stepped round-robin for ``--steps`` rounds (process CPU time; each row's ``vs_lora`` is the median
of the per-round ratios to LoRA's step), the memory still from one isolated process per method.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch

from .arguments import bench_parser, set_threads
from .output import Column, Table, append_jsonl, environment

LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def methods() -> list[str]:
    names = ["full", "lora"]
    if importlib.util.find_spec("peft") is not None:
        names.append("peft-lora")
    if importlib.util.find_spec("adaptdiff.adapters.sara") is not None:
        names.append("sara")
    return names + ["difffit", "fera"]


@dataclasses.dataclass
class Setup:
    model: str
    batch: int
    device: str
    steps: int
    clock: str
    threads: int | None


def apply_method(name: str, model):
    """Puts method ``name`` (one of the module docstring's list) on ``model`` as the benchmark
    configures it; returns the parameters it trains."""
    from adaptdiff import adapters

    if name == "full":
        return list(model.parameters())
    if name == "lora":
        return adapters.apply_lora(model, rank=16, alpha=16, target_modules=LORA_TARGETS)
    if name == "peft-lora":
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS)
        peft.inject_adapter_in_model(config, model)
        return [p for n, p in model.named_parameters() if "lora_" in n]
    if name == "sara":
        from adaptdiff.adapters.sara import apply_sara

        # t_embedder stays frozen, as in `adaptdiff adapt`
        return apply_sara(model, fraction=0.1, exclude=[r"^t_embedder\."])
    if name == "difffit":
        return adapters.apply_difffit(model)
    if name == "fera":
        return adapters.apply_fera(model, num_experts=3, rank=4, alpha=1,
                                   target_modules=LORA_TARGETS)  # fmt: skip
    raise ValueError(f"bench adapters: unknown method {name!r}")


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def build(name: str, setup: Setup):
    """Build the model, apply ``name``; returns ``(step, trainable, total)``, ``step()`` one
    fine-tuning step (forward, loss, backward, ``AdamW.step``)."""
    from adaptdiff.adapters import fera_loss
    from adaptdiff.models import create_dit

    if setup.threads:
        torch.set_num_threads(setup.threads)
    device = torch.device(setup.device)
    torch.manual_seed(0)
    with device:  # built on the device: DiT-XL/2's initialisation on the CPU takes long
        model = create_dit(setup.model, time_scale=1000.0)
    n_total = sum(p.numel() for p in model.parameters())
    params = apply_method(name, model)
    if name == "full":
        model.requires_grad_(True)
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    B, C, S = setup.batch, cfg.in_channels, cfg.input_size
    x0 = torch.randn(B, C, S, S, generator=g).to(device)
    eps = torch.randn(B, C, S, S, generator=g).to(device)
    t = torch.rand(B, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g).to(device)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    goal = eps - x0
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        if name == "fera":
            loss = fera_loss(model, x_t, t, goal, cond={"y": y})
        else:
            loss = (model(x_t, t, y)[:, :C] - goal).square().mean()
        loss.backward()
        opt.step()

    return step, n_train, n_total


def measure(name: str, setup: Setup) -> dict:
    """Build the model, apply ``name``, time the steps and measure the memory they add."""
    step, n_train, n_total = build(name, setup)
    device = torch.device(setup.device)
    B = setup.batch
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
            before = _rss_kib("VmRSS") * 1024
        except (OSError, TypeError):
            before = None
    times = []
    for i in range(setup.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step allocates gradients and optimizer state: warm-up
            times.append(time.process_time() - c0 if setup.clock == "cpu" else
                         time.perf_counter() - w0)  # fmt: skip
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = _rss_kib("VmHWM")
        peak = hwm * 1024 if hwm is not None else None
    added = peak - before if peak is not None and before is not None else None
    times.sort()
    return {
        "benchmark": "adapters",
        "method": name,
        "model": setup.model,
        "batch": B,
        "trainable": n_train,
        "total": n_total,
        "peak_added_mib": added / 2**20 if added is not None else None,
        "peak_mib": peak / 2**20 if peak is not None else None,
        "median_ms": 1e3 * statistics.median(times),
        "p20_ms": 1e3 * times[int(0.2 * (len(times) - 1))],
        "p80_ms": 1e3 * times[round(0.8 * (len(times) - 1))],
        "clock": setup.clock if not cuda else "cuda-sync-wall",
    }


def interleaved(names: list[str], setup: Setup, rounds: int) -> dict[str, list[float]]:
    """Step times (ms, process CPU time) of every method built in THIS process, one step of
    each per round (round-robin, after one warm-up step each), so that a loaded machine's
    slow spells fall on all methods alike. CPU only."""
    if setup.device != "cpu":
        raise ValueError("bench adapters: --interleave measures on the CPU only")
    steps = {name: build(name, setup)[0] for name in names}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steps.items():
            c0 = time.process_time()
            step()
            times[name].append(1e3 * (time.process_time() - c0))
    return times


def _isolated(name: str, setup: Setup) -> dict:
    code = (
        "import json, sys; from adaptdiff.bench.adapters import Setup, measure; "
        "print(json.dumps(measure(sys.argv[1], Setup(**json.loads(sys.argv[2])))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(dataclasses.asdict(setup))],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_vs_full(r: dict) -> str:
    return f"{r['memory_vs_full']:.2f}" if "memory_vs_full" in r else ""


TABLE = Table(
    Column("method", 10, "method", left=True),
    Column("trainable", 12, "trainable", ","),
    Column("%", 6, lambda r: 100 * r["trainable"] / r["total"], ".2f", suffix="%"),
    Column(
        "peak added MiB",
        15,
        lambda r: "n/a" if r["peak_added_mib"] is None else f"{r['peak_added_mib']:.0f}",
    ),  # fmt: skip
    Column("ms/step", 9, "median_ms", ".1f"),
    Column("vs full", 8, _memory_vs_full),
)


def main(argv: list[str] | None = None) -> int:
    shared = ("quick", "device", "json", "threads", "clock")
    p = bench_parser("adapters", __doc__.splitlines()[0], shared, quick="DiT-S/8, batch 2")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--batch", type=int, default=None, help="default 2 (CPU), 8 (CUDA)")
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {methods()}")
    p.add_argument("--no-isolate", action="store_true", help="all methods in this process")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="CPU: time all methods in this process, round-robin, --steps rounds (memory from "
        "one isolated process per method, one step); rows get vs_lora, the median of the "
        "per-round ratios to LoRA's step",
    )
    p.add_argument("--tag", default=None, help="a label stored in each row (e.g. before/after)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    model = "DiT-S/8" if args.quick else ("DiT-XL/2" if args.device == "cuda" else "DiT-B/2")
    batch = args.batch or (8 if args.device == "cuda" and not args.quick else 2)
    setup = Setup(model, batch, args.device, args.steps, args.clock, args.threads)
    names = args.methods or methods()
    env = environment(torch.device(args.device), args.clock)
    print(f"{model}, batch {batch}, {args.device}, one fine-tuning step (AdamW), "
          f"median of {args.steps} ({setup.clock} clock)")  # fmt: skip
    if args.interleave:
        once = dataclasses.replace(setup, steps=1)
        rows = [measure(n, once) if args.no_isolate else _isolated(n, once) for n in names]
        times = interleaved(names, setup, args.steps)
        for r in rows:
            ts = sorted(times[r["method"]])
            r.update(median_ms=statistics.median(ts), p20_ms=ts[int(0.2 * (len(ts) - 1))],
                     p80_ms=ts[round(0.8 * (len(ts) - 1))], timing="interleaved",
                     rounds=args.steps, clock="cpu")  # fmt: skip
            if "lora" in times:
                ratios = [a / b for a, b in zip(times[r["method"]], times["lora"], strict=True)]
                r["vs_lora"] = round(statistics.median(ratios), 3)
    else:
        rows = [measure(n, setup) if args.no_isolate else _isolated(n, setup) for n in names]
    if args.tag:
        for r in rows:
            r["tag"] = args.tag
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        if full and full["peak_added_mib"] and r["peak_added_mib"] is not None:
            r["memory_vs_full"] = round(r["peak_added_mib"] / full["peak_added_mib"], 3)
    print(TABLE.header())
    for r in rows:
        print(TABLE.line(r))
    print("vs full: peak memory added by the step / full fine-tuning's")
    for r in rows:
        if "vs_lora" in r:
            print(f"{r['method']}: step {r['vs_lora']:.2f}x LoRA's (median of per-round ratios)")
    if args.json:
        append_jsonl(args.json, rows, env)  # each row names its benchmark
    return 0


if __name__ == "__main__":
    sys.exit(main())
