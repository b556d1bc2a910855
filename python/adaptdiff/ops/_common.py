"""Shared plumbing of the op wrappers: backend choice and fake-kernel checks."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from typing import Literal

import torch

from .._loader import _C, has_kernel, op_names

Impl = Literal["auto", "kernel", "reference"]

log = logging.getLogger("adaptdiff.ops")

# Decided once at import, so wrappers stay traceable by torch.compile (a dict lookup, no
# dispatcher query inside the graph).
KERNELS_DISABLED = os.environ.get("ADAPTDIFF_DISABLE_KERNELS", "") == "1"
_AVAILABLE = {(op, dev): has_kernel(op, dev) for op in op_names() for dev in ("cpu", "cuda")}


# CUDA kernels that compile but have not yet passed their tests on a GPU. On CUDA their
# wrappers run the pure-torch reference unless the user opts in (`unverified_cuda`, or
# ADAPTDIFF_UNVERIFIED_CUDA); a GPU run whose tests pass removes the name from this set.
# A name that is not an op is a kernel path of one (UNVERIFIED_CUDA_PATHS): without the opt-in
# the op runs its verified CUDA kernel instead of that path (not the reference).
UNVERIFIED_CUDA: frozenset[str] = frozenset({"selective_scan", "block_attention_tc"})
UNVERIFIED_CUDA_ENV = "ADAPTDIFF_UNVERIFIED_CUDA"
# What each unverified name is ("compiled, not yet run on a GPU"), for `adaptdiff info`.
UNVERIFIED_CUDA_WHAT: dict[str, str] = {
    "selective_scan": "selective_scan's CUDA kernel (forward and backward)",
    "block_attention_tc": (
        "block_attention's tensor-core path (float16/bfloat16, head dim 64 or 128, sm_80+; "
        "otherwise, or without the opt-in, its verified CUDA kernel runs)"
    ),
}
# Kernel paths inside an op's CUDA kernel, by op: the C++ side reads a flag that
# _sync_native() sets whenever the opt-in changes (never inside a wrapper, so wrappers stay
# traceable). The raw torch.ops.adaptdiff.block_attention follows the same flag.
UNVERIFIED_CUDA_PATHS: dict[str, str] = {"block_attention_tc": "block_attention"}


def _unverified_names(where: str, names: Iterable[str]) -> frozenset[str]:
    """``names`` as a set of op names ("all": every unverified op); unknown names raise."""
    names = [names] if isinstance(names, str) else list(names)
    known = set(op_names()) | UNVERIFIED_CUDA
    out: set[str] = set()
    for name in names:
        if name == "all":
            out |= UNVERIFIED_CUDA
        elif name in known:
            out.add(name)
        else:
            raise ValueError(f"{where}: unknown op {name!r} (ops: 'all' or op names)")
    return frozenset(out)


def _from_env() -> frozenset[str]:
    raw = os.environ.get(UNVERIFIED_CUDA_ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return _unverified_names(UNVERIFIED_CUDA_ENV, names)


def _sync_native() -> None:
    """Passes the opt-in of the kernel paths to the native library (a flag read per call)."""
    _C._set_block_attention_tensor_cores("block_attention_tc" in _opted_in)


# The ops whose unverified CUDA kernel the user opted in to; reassigned, never mutated.
_opted_in: frozenset[str] = _from_env()
_sync_native()
_warned: set[str] = set()


class unverified_cuda:  # lower case: used like torch.set_grad_enabled, a call or a `with`
    """Opt in to (``enable=True``) or out of the CUDA kernels not yet verified on a GPU.

    The ops in ``UNVERIFIED_CUDA`` have a CUDA kernel that compiles but has not yet passed its
    tests on a GPU; on CUDA their wrappers run the pure-torch reference (``impl="auto"``, with
    a one-time warning) or raise (``impl="kernel"``) until the user opts in. ``ops``: op names
    (default: every unverified op). Takes effect at the call; as a context manager, the previous
    choice comes back on exit. ``ADAPTDIFF_UNVERIFIED_CUDA=all`` (or comma-separated op names)
    sets the choice at import. The raw ``torch.ops.adaptdiff.<op>`` always runs the kernel.
    ``"block_attention_tc"`` is a kernel path, not an op: it lets ``block_attention``'s CUDA
    kernel (verified) take its tensor-core path (not yet verified) where it applies, for the
    wrapper and the raw op alike; without it that kernel runs its verified path.
    """

    def __init__(self, enable: bool = True, ops: Iterable[str] | None = None) -> None:
        global _opted_in
        if not isinstance(enable, bool):
            raise TypeError(
                f"adaptdiff.ops.unverified_cuda: enable must be a bool, got {type(enable).__name__}"
            )
        names = (
            UNVERIFIED_CUDA
            if ops is None
            else _unverified_names("adaptdiff.ops.unverified_cuda: ops", ops)
        )
        self._previous = _opted_in
        _opted_in = _opted_in | names if enable else _opted_in - names
        _sync_native()

    def __enter__(self) -> unverified_cuda:
        return self

    def __exit__(self, *exc) -> None:
        global _opted_in
        _opted_in = self._previous
        _sync_native()


def unverified_cuda_enabled(op: str) -> bool:
    """True when ``op``'s CUDA kernel may run: verified, or opted in to."""
    return op not in UNVERIFIED_CUDA or op in _opted_in


def unverified_message(op: str) -> str:
    return (
        f"adaptdiff::{op}: its CUDA kernel compiles but has not yet passed its tests on a GPU; "
        f"opt in to it with adaptdiff.ops.unverified_cuda() or {UNVERIFIED_CUDA_ENV}={op}"
    )


def choose_kernel(op: str, impl: str, device_type: str, available: bool) -> bool:
    """The backend decision of :func:`use_kernel`, given whether a kernel is registered.

    ``reference`` runs the reference; ``kernel`` runs the kernel or raises (none registered,
    or an unverified CUDA kernel not opted in to); ``auto`` runs the kernel when one is
    registered, kernels are not disabled, and (on CUDA) it is verified or opted in to, else the
    reference (warning once per op when it is an unverified CUDA kernel that is skipped).
    """
    if impl == "reference":
        return False
    if impl not in ("auto", "kernel"):
        raise ValueError(
            f"adaptdiff::{op}: impl must be 'auto', 'kernel' or 'reference', got {impl!r}"
        )
    unverified = device_type == "cuda" and not unverified_cuda_enabled(op)
    if impl == "kernel":
        if not available:
            raise RuntimeError(
                f"adaptdiff::{op}: no {device_type} kernel is registered in this build "
                "(see `adaptdiff info`)"
            )
        if unverified:
            raise RuntimeError(unverified_message(op) + " (impl='kernel'), or use impl='reference'")
        return True
    if KERNELS_DISABLED or not available:
        if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
            log.debug("adaptdiff::%s: running the reference on %s", op, device_type)
        return False
    if unverified:
        if op not in _warned and not torch.compiler.is_compiling():
            _warned.add(op)
            warnings.warn(
                unverified_message(op) + "; running the pure-torch reference instead",
                UserWarning,
                stacklevel=4,
            )
        return False
    return True


def use_kernel(op: str, impl: str, device: torch.device) -> bool:
    """True to call the registered kernel, False to run the pure-torch reference.

    ``auto`` takes the kernel when one is registered for the device (and kernels are not
    disabled by ``ADAPTDIFF_DISABLE_KERNELS=1``, and a CUDA kernel is not an unverified one
    the user has not opted in to, see :class:`unverified_cuda`); ``kernel`` never falls back
    and raises instead; ``reference`` always runs the reference.
    """
    return choose_kernel(op, impl, device.type, _AVAILABLE.get((op, device.type), False))


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


# Autocast rules registered from Python live in this library object (kept alive here).
_AUTOCAST_LIB = torch.library.Library("adaptdiff", "IMPL")


def register_autocast_like_linear(op: str) -> None:
    """Under autocast, run ``adaptdiff::<op>`` as autocast runs ``nn.Linear``: its floating
    tensor arguments cast to the autocast dtype of the moment, then the op with autocast off
    below it. (``torch.library.register_autocast`` fixes one dtype at registration; CPU and
    CUDA autocast each take bfloat16 or float16.) The casts are recorded by autograd, so
    float32 parameters get float32 gradients."""
    overload = getattr(torch.ops.adaptdiff, op).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, below=below):
            dtype = torch.get_autocast_dtype(device_type)
            args = [
                a.to(dtype)
                if isinstance(a, torch.Tensor)
                and a.is_floating_point()
                and a.device.type == device_type
                else a
                for a in args
            ]
            with torch._C._ExcludeDispatchKeyGuard(below):
                return overload(*args)

        _AUTOCAST_LIB.impl(op, kernel, key, with_keyset=True)
