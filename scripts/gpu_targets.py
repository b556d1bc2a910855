"""The GPU performance targets, timed in one process against their baselines (ratios):

- ``attention``: ``block_attention`` bf16, forward and forward + backward, layouts
  ``block_causal`` and ``bd3``, B=4, H=16, Hk=4, Dh=128, block size 16, L = 2048, 4096, 8192
  (``bd3``: ``[noisy | clean]`` halves of L/2), against FlexAttention (compiled, the same
  ``mask_mod``) and SDPA with the dense boolean mask;
- ``sampled_wgrad``: at 10 % density on DiT-XL/2's linear shapes (2,048 tokens) against a dense
  ``grad_out.T @ x`` and a gather of the entries;
- ``sara_step``: one fine-tuning step of DiT-XL/2 (batch 8) with SaRA (10 %) and with LoRA r=16,
  float32 and bf16 autocast: step time and the peak memory the steps add;
- ``ras``: RAS (ratio 0.5, resets at 43 % and 71 % of 28 euler steps) on a random DiT-XL/2, batch
  1 and 4, 256 and 1,024 image tokens, against the dense sampler.

Kernel timings use CUDA events per call (:func:`adaptdiff.bench.harness.time_fn`, median, L2
flushed); fine-tuning steps CUDA events around each step (median); RAS and the dense sampler the
wall clock around whole synchronized sampling runs (:func:`adaptdiff.accel.evaluate.evaluate`,
best of 2). One process, TF32 left off (torch's default). Every row is appended to ``--json``
as soon as it is measured, so a run cut off by its time limit keeps what it finished.

    python scripts/gpu_targets.py --part attention --json out.jsonl          # on the GPU
    python scripts/gpu_targets.py --part sampled_wgrad --device cpu --quick  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from adaptdiff import ops
from adaptdiff.bench.kernels.block_attention import flex_mask_mod
from adaptdiff.ops import reference

PARTS = ("attention", "sampled_wgrad", "sara_step", "ras")


# --------------------------------------------------------------------------------- plumbing


def emit(row: dict, path: str | None) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, calls: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of ``calls`` calls after ``warmup`` calls: CUDA events on the GPU,
    the wall clock (after a synchronize) elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(calls):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def kernel_us(fn, device: torch.device, quick: bool) -> float:
    from adaptdiff.bench.harness import Options, time_fn

    return time_fn(fn, Options(device, quick)).median_us


# -------------------------------------------------------------------------------- attention


mask_mod_for = flex_mask_mod  # the kernels benchmark's, one definition


def attention(args, device) -> None:
    lengths = (64, 128) if args.quick else (2048, 4096, 8192)
    for L in lengths:
        for layout in ("block_causal", "bd3"):
            _attention_case(args, device, L, layout)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _attention_case(args, device, L: int, layout: str) -> None:
    B, H, Hk, D, bs = (1, 2, 1, 32, 16) if args.quick else (4, 16, 4, 128, 16)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, Hk, L, D, generator=g).to(device, dtype) for _ in range(2))
    grad = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    dense = reference.block_mask(layout, L, L, bs, device)
    impls = {
        "kernel": lambda q, k, v: ops.block_attention(q, k, v, bs, layout, impl="kernel"),
        "sdpa_dense_mask": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=H != Hk
        ),
    }
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block_mask = create_block_mask(
                mask_mod_for(layout, L, bs), None, None, L, L, device=device
            )
            attend = torch.compile(flex_attention)
            impls["flex"] = lambda q, k, v: attend(
                q, k, v, block_mask=block_mask, enable_gqa=H != Hk
            )
        except Exception as e:  # reported, the others still timed
            print(f"flex {layout} L={L}: {type(e).__name__}: {e}", file=sys.stderr)
    with torch.no_grad():
        want = impls["sdpa_dense_mask"](q, k, v).float()
    for backward in (False, True):
        row = dict(
            target="block_attention", layout=layout, B=B, H=H, Hk=Hk, L=L, Dh=D,
            block_size=bs, dtype="bfloat16", pass_="fwd+bwd" if backward else "fwd",
        )  # fmt: skip
        leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
        for name, fn in impls.items():
            try:
                if not backward:
                    with torch.no_grad():
                        err = (fn(q, k, v).float() - want).abs().max().item()
                    row[f"{name}_max_err_vs_sdpa"] = err
                call = _attention_call(fn, leaves, grad if backward else None)
                row[f"{name}_us"] = kernel_us(call, device, args.quick)
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for base in ("flex", "sdpa_dense_mask"):
            if f"{base}_us" in row and "kernel_us" in row:
                row[f"{base}_over_kernel"] = row[f"{base}_us"] / row["kernel_us"]
        emit(row, args.json)


def _attention_call(fn, leaves, grad):
    """One forward (``grad`` None) or forward + backward call of ``fn`` on ``leaves``."""

    def call():
        with torch.set_grad_enabled(grad is not None):
            out = fn(*leaves)
            if grad is not None:
                out.backward(grad)
        return out

    return call


# ---------------------------------------------------------------------------- sampled_wgrad


def sampled_wgrad(args, device) -> None:
    shapes = [(96, 64)] if args.quick else [(3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608)]
    for dtype in (torch.float32, torch.bfloat16):
        for O, I in shapes:
            _wgrad_case(args, device, dtype, O, I)


def _wgrad_case(args, device, dtype, O: int, I: int) -> None:
    N = 64 if args.quick else 2048  # DiT-XL/2: batch 8 x 256 tokens
    g = torch.Generator().manual_seed(0)
    go = torch.randn(N, O, generator=g).to(device, dtype)
    x = torch.randn(N, I, generator=g).to(device, dtype)
    nnz = int(0.1 * O * I)
    idx = torch.randperm(O * I, generator=g)[:nnz].sort().values.to(device)
    row = dict(target="sampled_wgrad", N=N, O=O, I=I, density=0.1,
               dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    got = ops.sampled_wgrad(go, x, idx, impl="kernel").float()
    want = (go.float().T @ x.float()).view(-1)[idx]
    row["max_err_vs_fp32_dense"] = (got - want).abs().max().item()
    row["kernel_us"] = kernel_us(
        lambda: ops.sampled_wgrad(go, x, idx, impl="kernel"), device, args.quick
    )
    row["dense_gather_us"] = kernel_us(lambda: (go.T @ x).view(-1)[idx], device, args.quick)
    row["dense_over_kernel"] = row["dense_gather_us"] / row["kernel_us"]
    emit(row, args.json)


# -------------------------------------------------------------------------------- sara_step


def sara_step(args, device) -> None:
    for autocast in (False, True):
        for method in ("sara", "lora"):
            _sara_case(args, device, method, autocast)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _sara_case(args, device, method: str, autocast: bool) -> None:
    from adaptdiff.bench.adapters import apply_method
    from adaptdiff.models import create_dit

    name, batch, steps = ("DiT-S/8", 2, 2) if args.quick else ("DiT-XL/2", 8, 10)
    torch.manual_seed(0)
    with device:
        model = create_dit(name, time_scale=1000.0)
    params = apply_method(method, model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    C, S = cfg.in_channels, cfg.input_size
    x0, eps = (torch.randn(batch, C, S, S, generator=g).to(device) for _ in range(2))
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
    goal = eps - x0
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = (model(x_t, t, y)[:, :C].float() - goal).square().mean()
        loss.backward()
        opt.step()

    row = dict(target="sara_step", method=method, model=name, batch=batch,
               precision="bf16 autocast" if autocast else "float32",
               trainable=sum(p.numel() for p in params))  # fmt: skip
    try:
        step()  # allocates gradients and optimizer state
        sync(device)
    except Exception as e:  # a method that fails here is a row, not the end of the part
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(row, args.json)
        return
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(step, device, steps, warmup=1)
    row.update(median_ms=statistics.median(times), min_ms=min(times))
    if before is not None:
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mib"] = peak / 2**20
        row["peak_added_mib"] = (peak - before) / 2**20
    emit(row, args.json)


# --------------------------------------------------------------------------------------- ras


def ras(args, device) -> None:
    from adaptdiff.accel.evaluate import evaluate
    from adaptdiff.bench.accel.dit_b import random_dit_b
    from adaptdiff.bench.accel.methods import ras_method

    name, steps = ("DiT-S/8", 7) if args.quick else ("DiT-XL/2", 28)
    sizes = (16,) if args.quick else (32, 64)  # latent side: 256 and 1,024 tokens at patch 2
    resets = (round(steps * 0.43), round(steps * 0.71))
    start = max(1, round(steps / 7))
    method = ras_method(
        f"ratio 0.5, resets {resets[0]},{resets[1]}",
        sample_ratio=0.5,
        start_step=start,
        error_reset_steps=resets,
    )
    for size in sizes:
        with device:  # initialised on the device: DiT-XL/2's init on the CPU takes long
            model = random_dit_b(size=size, name=name)
        for batch in (1, 4):
            y = torch.full((batch,), 207, device=device)
            rows = evaluate(
                model, [method], model_name=f"{name} random {size}x{size}x4",
                shape=(batch, 4, size, size), repeats=1 if args.quick else 2,
                sampler=dict(method="euler", steps=steps, prediction="flow", cond={"y": y}),
            )  # fmt: skip
            exact = next(r for r in rows if r.method.lower().startswith("exact"))
            for r in rows:
                if r is exact:
                    continue
                emit(dict(target="ras", model=name, batch=batch, latent=size,
                          tokens=(size // model.config.patch_size) ** 2, steps=steps,
                          method=f"{r.method} {r.setting}", seconds=r.seconds,
                          dense_seconds=exact.seconds, speedup=exact.seconds / r.seconds,
                          compute=r.compute, psnr=r.psnr), args.json)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=PARTS, action="append", help="default: all, in order")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--json", default=None, help="append every row to this JSON-lines file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_targets: no GPU visible", file=sys.stderr)
        return 2
    failed = 0
    with ops.unverified_cuda(True) if device.type == "cuda" else contextlib.nullcontext():
        for part in args.part or PARTS:
            try:
                globals()[part](args, device)
            except Exception:
                failed += 1
                print(f"gpu_targets {part}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
