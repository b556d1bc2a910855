"""Loads the native library and answers what it provides.

Order matters: torch first (it loads libc10/libtorch by soname), then the build-information
file (plain Python, so a version mismatch is reported before a symbol error can happen),
then ``_C``, whose static initialisers register ``torch.ops.adaptdiff.*``. Nothing here
touches CUDA state.
"""

from __future__ import annotations

import os

import torch

from . import _build_info

NAMESPACE = "adaptdiff"


def _check_torch_version() -> None:
    built, running = _build_info.torch_version, torch.__version__
    if built != running and os.environ.get("ADAPTDIFF_ALLOW_TORCH_MISMATCH") != "1":
        raise ImportError(
            f"adaptdiff was built against torch {built} but torch {running} is running; "
            "libtorch has no stable C++ ABI across releases. Rebuild adaptdiff against the "
            "installed torch: pip install --no-build-isolation . "
            "(or set ADAPTDIFF_ALLOW_TORCH_MISMATCH=1 to try anyway)"
        )


_check_torch_version()
from . import _C  # noqa: E402  (registers the ops)


def build_info() -> dict:
    """How the native library was built: torch version, CUDA on/off and archs, commit."""
    info = dict(_C.build_info())
    info.update(
        torch_cuda_version=_build_info.torch_cuda_version,
        cuda_archs=_build_info.cuda_archs,
        git_commit=_build_info.git_commit,
        build_type=_build_info.build_type,
    )
    return info


def op_names() -> list[str]:
    """Every registered ``adaptdiff::`` op, read from the dispatcher."""
    names = {
        n.split("::", 1)[1].split(".", 1)[0]
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith(NAMESPACE + "::")
    }
    return sorted(names)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "autograd": "Autograd"}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``adaptdiff::op`` has a kernel for ``device_type`` ("cpu", "cuda", "meta",
    "autograd") registered with the dispatcher."""
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)
