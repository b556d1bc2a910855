"""The benchmark harness: cases, timing and result records (the output: :mod:`.output`).

A :class:`Case` is one op on one shape and dtype. :func:`run_case` times the pure-torch
reference and the registered kernel through the public wrappers (``impl="reference"`` and
``impl="kernel"``), in the same process on the same device, optionally the reference under
``torch.compile`` too. An op without a kernel for the device gets a "no kernel" row: the
reference is never timed in its place.

Timing: on the CPU ``torch.utils.benchmark.Timer.blocked_autorange`` with every torch
thread, by the wall clock, or with ``clock="cpu"`` by the process's CPU time (summed over
threads: use it with one thread, on a shared machine where preemption swamps the wall
clock); on CUDA a warm-up, then one pair of CUDA events per call with the L2 cache flushed
in between (the ``triton.testing.do_bench`` recipe). Both report the median and the 20th
and 80th percentiles in microseconds.

GB/s is ``Case.bytes`` (what an ideal implementation must read plus write, counted by each
bench module) over the median time, so implementations are compared on one yardstick.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils.benchmark as tbench

import adaptdiff

# A setup builds the inputs on a device and returns call(impl) -> the op's result tensor
# (for an in-place op, the tensor it wrote).
Setup = Callable[[torch.device], Callable[[str], torch.Tensor]]


def dims(**sizes: int) -> dict[str, int]:
    """Named sizes of a case, in the order given (B, N, D, K, ...)."""
    return dict(sizes)


@dataclass(frozen=True)
class Case:
    op: str  # adaptdiff op name
    label: str  # where the shape comes from: "DiT-XL/2 256px", "SD3 1024px", "tiny"
    shape: dict[str, int]  # named sizes
    dtype: torch.dtype
    bytes: int  # bytes read + written by an ideal implementation
    setup: Setup
    flops: int = 0  # for matmul-like ops, reported as TFLOP/s
    variant: str = ""  # op argument that is not a size: "metric=std", "n=4"

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]" if self.variant else self.op

    @property
    def shape_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


@dataclass
class Result:
    case: Case
    impl: str  # "reference", "reference-compiled", "kernel"
    status: str = "ok"  # "ok", "no kernel", "mismatch: ...", "error: ..."
    median_us: float | None = None
    p20_us: float | None = None
    p80_us: float | None = None
    ratio: float | None = None  # reference time / this time: > 1 means faster than the reference

    @property
    def gbps(self) -> float | None:
        return None if self.median_us is None else self.case.bytes / (self.median_us * 1e3)

    @property
    def tflops(self) -> float | None:
        if self.median_us is None or not self.case.flops:
            return None
        return self.case.flops / (self.median_us * 1e6)

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "no kernel")


@dataclass
class Options:
    device: torch.device
    quick: bool = False
    compiled: bool = False
    min_run_time: float | None = None  # CPU seconds per timing; None: 0.02 quick, 0.25 full
    clock: str = "wall"  # CPU timing: "wall" or "cpu" (process CPU time)
    env: dict = field(default_factory=dict)

    @property
    def cpu_min_run_time(self) -> float:
        if self.min_run_time is not None:
            return self.min_run_time
        return 0.02 if self.quick else 0.25


# ---------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float


def _quantiles(times_us: list[float]) -> Timing:
    if len(times_us) == 1:
        t = times_us[0]
        return Timing(t, t, t)
    deciles = statistics.quantiles(times_us, n=10, method="inclusive")
    return Timing(statistics.median(times_us), deciles[1], deciles[7])


def time_cpu(fn: Callable[[], object], min_run_time: float, clock: str = "wall") -> Timing:
    timer = tbench.Timer(
        stmt="fn()",
        globals={"fn": fn},
        num_threads=torch.get_num_threads(),
        timer=time.process_time if clock == "cpu" else timeit.default_timer,
    )
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return _quantiles([t * 1e6 for t in m.times])


_L2_FLUSH: dict[int, torch.Tensor] = {}


def time_cuda(fn: Callable[[], object], quick: bool) -> Timing:
    """Warm up, then time each call with its own CUDA events, the L2 cache flushed before it."""
    device = torch.cuda.current_device()
    flush = _L2_FLUSH.get(device)
    if flush is None:  # larger than any current L2 (H100: 50 MB, B200: 126 MB)
        flush = _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    warmup_ms, rep_ms = (5, 20) if quick else (25, 100)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    reps = min(max(5 if quick else 20, int(rep_ms / estimate_ms)), 1000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)])


def time_fn(fn: Callable[[], object], opts: Options) -> Timing:
    if opts.device.type == "cuda":
        return time_cuda(fn, opts.quick)
    return time_cpu(fn, opts.cpu_min_run_time, opts.clock)


# ----------------------------------------------------------------------------- running


def _tolerance(dtype: torch.dtype) -> dict:
    # A guard against timing a wrong answer, not a precision test (tests/ops does that):
    # loose enough for another summation order in a GEMM or a 12M-element reduction.
    if dtype in (torch.float16, torch.bfloat16):
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-3, atol=1e-4)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _timed(case: Case, impl: str, fn, opts: Options, ref_us: float | None) -> Result:
    t = time_fn(fn, opts)
    ratio = None if ref_us is None else ref_us / t.median_us
    return Result(case, impl, "ok", t.median_us, t.p20_us, t.p80_us, ratio)


def run_case(case: Case, opts: Options) -> list[Result]:
    """Reference (eager, optionally compiled), then the kernel; each checked against the
    reference's output before it is timed."""
    call = case.setup(opts.device)
    with torch.no_grad():
        expected = call("reference").clone()
        ref = _timed(case, "reference", lambda: call("reference"), opts, None)
        ref.ratio = 1.0
        results = [ref]
        if opts.compiled:
            results.append(_run_compiled(case, call, expected, opts, ref.median_us))
        if not adaptdiff.has_kernel(case.op, opts.device.type):
            results.append(Result(case, "kernel", "no kernel"))
        else:
            kernel = _run_checked(
                case, "kernel", lambda: call("kernel"), expected, opts, ref.median_us
            )
            results.append(kernel)
    return results


def _run_checked(case, impl, fn, expected, opts, ref_us: float) -> Result:
    try:
        got = fn()
    except Exception as e:  # a broken implementation is reported, not fatal to the suite
        return Result(case, impl, f"error: {_first_line(e)}")
    status = "ok"
    try:
        torch.testing.assert_close(got.float(), expected.float(), **_tolerance(case.dtype))
    except AssertionError:
        err = (got.float() - expected.float()).abs().max().item()
        status = f"mismatch: max abs error {err:.3g} against the reference"
    result = _timed(case, impl, fn, opts, ref_us)
    result.status = status
    return result


def _run_compiled(case, call, expected, opts, ref_us) -> Result:
    compiled = torch.compile(lambda: call("reference"))
    result = _run_checked(case, "reference-compiled", compiled, expected, opts, ref_us)
    torch._dynamo.reset()
    return result
