"""Shared plumbing of the op wrappers: backend choice and fake-kernel checks."""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from .._loader import has_kernel, op_names

Impl = Literal["auto", "kernel", "reference"]

log = logging.getLogger("adaptdiff.ops")

# Decided once at import, so wrappers stay traceable by torch.compile (a dict lookup, no
# dispatcher query inside the graph).
KERNELS_DISABLED = os.environ.get("ADAPTDIFF_DISABLE_KERNELS", "") == "1"
_AVAILABLE = {(op, dev): has_kernel(op, dev) for op in op_names() for dev in ("cpu", "cuda")}


def use_kernel(op: str, impl: str, device: torch.device) -> bool:
    """True to call the registered kernel, False to run the pure-torch reference.

    ``auto`` takes the kernel when one is registered for the device (and kernels are not
    disabled by ``ADAPTDIFF_DISABLE_KERNELS=1``); ``kernel`` never falls back and raises
    instead; ``reference`` always runs the reference.
    """
    if impl == "reference":
        return False
    if impl not in ("auto", "kernel"):
        raise ValueError(
            f"adaptdiff::{op}: impl must be 'auto', 'kernel' or 'reference', got {impl!r}"
        )
    available = _AVAILABLE.get((op, device.type), False)
    if impl == "kernel":
        if not available:
            raise RuntimeError(
                f"adaptdiff::{op}: no {device.type} kernel is registered in this build "
                "(see `adaptdiff info`)"
            )
        return True
    if KERNELS_DISABLED or not available:
        if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
            log.debug("adaptdiff::%s: running the reference on %s", op, device.type)
        return False
    return True


def check(cond, op: str, message: str) -> None:
    """``torch._check`` with the project's message format, for fake kernels."""
    torch._check(cond, lambda: f"adaptdiff::{op}: {message}")


FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    check(
        t.dtype in FLOATING,
        op,
        f"{name} must be float32, float16 or bfloat16 (float64 on the CPU), got {t.dtype}",
    )


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    check(
        t.device == ref.device,
        op,
        f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}",
    )


def check_token_index(op: str, data: torch.Tensor, data_name: str, index: torch.Tensor) -> None:
    check(data.dim() == 3, op, f"{data_name} must be 3-D [B, N, D], got shape {tuple(data.shape)}")
    check(index.dtype == torch.int64, op, f"index must be int64, got {index.dtype}")
    check_same_device(op, "index", index, data_name, data)
    check(index.dim() == 2, op, f"index must be 2-D [B, K], got shape {tuple(index.shape)}")
    check(
        index.shape[0] == data.shape[0],
        op,
        f"index must have batch size {data.shape[0]} (from {data_name}), "
        f"got shape {tuple(index.shape)}",
    )


INFERENCE_ONLY: set[str] = set()


def no_backward(op: str):
    """Autograd for an inference-only op: a clear error instead of a silent zero gradient."""
    INFERENCE_ONLY.add(op)

    def backward(ctx, *grads):
        raise RuntimeError(f"adaptdiff::{op}: has no backward (inference-only op)")

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"adaptdiff::{op}", backward, setup_context=setup_context)
