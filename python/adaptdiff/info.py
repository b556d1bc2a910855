"""`adaptdiff info` / `python -m adaptdiff.info`: build and kernel availability.

Everything is read from the dispatcher and the build record, not from a hand-kept list.
"""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, build_info, has_kernel, op_names
from .ops._common import (
    INFERENCE_ONLY,
    KERNELS_DISABLED,
    UNVERIFIED_CUDA,
    UNVERIFIED_CUDA_ENV,
    UNVERIFIED_CUDA_WHAT,
    unverified_cuda_enabled,
)


def op_table() -> list[dict]:
    rows = []
    for op in op_names():
        if op in INFERENCE_ONLY:
            autograd = "inference-only"
        else:
            autograd = "yes" if has_kernel(op, "autograd") else "no"
        rows.append(
            dict(
                op=op,
                cpu=has_kernel(op, "cpu"),
                cuda=has_kernel(op, "cuda"),
                fake=has_kernel(op, "meta"),
                autograd=autograd,
            )
        )
    return rows


def report() -> str:
    b = build_info()
    mark = {True: "yes", False: "-"}
    lines = [
        f"adaptdiff {__version__} (commit {b['git_commit'] or 'unknown'}, {b['build_type']})",
        f"python     {sys.version.split()[0]} on {platform.machine()}",
        f"torch      running {torch.__version__}, built against {b['torch_version']}",
        f"CUDA       kernels {'ON, archs ' + b['cuda_archs'] if b['with_cuda'] else 'OFF'}"
        f" (torch CUDA {torch.version.cuda or 'none'})",
        f"OpenMP     {'yes' if b['openmp'] else 'no'}; threads {torch.get_num_threads()}",
    ]
    if KERNELS_DISABLED:
        lines.append("ADAPTDIFF_DISABLE_KERNELS=1: wrappers run the pure-torch references")
    table = op_table()
    w = max([2] + [len(r["op"]) for r in table]) + 1
    lines += ["", f"{'op':<{w}} {'CPU':<5} {'CUDA':<5} {'fake':<5} autograd"]
    for r in table:
        lines.append(
            f"{r['op']:<{w}} {mark[r['cpu']]:<5} {mark[r['cuda']]:<5} {mark[r['fake']]:<5} "
            f"{r['autograd']}"
        )
    lines += [
        "",
        "CUDA, compiled, not yet run on a GPU (opt-in: adaptdiff.ops.unverified_cuda() or "
        f"{UNVERIFIED_CUDA_ENV}=<name>):",
    ]
    for name in sorted(UNVERIFIED_CUDA):
        on = "opted in" if unverified_cuda_enabled(name) else "off"
        lines.append(f"  {name}: {UNVERIFIED_CUDA_WHAT[name]} [{on}]")
    if not b["with_cuda"]:
        lines += [
            "",
            "This build has no CUDA kernels: on a GPU, wrappers with impl='auto' "
            "run the pure-torch references.",
        ]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
