"""Crash-safe checkpoints: safetensors weights plus a training-state file, written atomically.

A checkpoint is a directory::

    <out_dir>/step_0001000/
        model.safetensors   the model's state dict
        ema.safetensors     the EMA copy's state dict (absent when there is no EMA)
        state.pt            optimiser, scheduler, step, RNG states, config, and the size and
                            sha256 of both weight files
    <out_dir>/latest        the name of the newest complete checkpoint

Writing is atomic at two levels. The files are written and fsynced inside a temporary
directory next to the target, which is then renamed into place, and the parent directory is
fsynced; ``latest`` is replaced the classic way (temporary file in the same directory, fsync,
rename, fsync the directory). A crash or an exception at any point leaves the previous
checkpoint and ``latest`` untouched. Loading checks sizes and hashes, the safetensors headers
and the names, shapes and dtypes against the model before anything is copied, so a truncated,
corrupted or mismatched checkpoint raises :class:`CheckpointError` and never half-loads.

Replacing an existing checkpoint directory takes two renames (POSIX cannot swap directories);
a crash between them leaves the old copy under ``.<name>.old-*``, which :func:`latest_checkpoint`
moves back. A write that fails (disk full, permission denied) raises :class:`CheckpointError`
naming the path and the cause, and keeps the previous checkpoint. The fault tests kill a real
process at each point of :data:`KILL_POINTS` through ``ADAPTDIFF_CKPT_KILL_AT=<point>``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not match the model, or could not
    be written."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permission denied, ...); the previous one is
    kept. Also an ``OSError``, so handlers of the cause still catch it."""


# Where a test may SIGKILL the writing process (``ADAPTDIFF_CKPT_KILL_AT``): before anything,
# half-way through and after each file, between the two renames of a replaced directory, after
# the swap (before ``latest`` moves), half-way through ``latest``, and after it.
KILL_POINTS = (
    "start",
    f"during:{MODEL_FILE}",
    f"after:{MODEL_FILE}",
    f"during:{EMA_FILE}",
    f"after:{EMA_FILE}",
    f"during:{STATE_FILE}",
    f"after:{STATE_FILE}",
    "mid_swap",
    "after_swap",
    f"during:{LATEST_FILE}",
    "done",
)


def _kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at ``name`` when ``ADAPTDIFF_CKPT_KILL_AT`` says so."""
    if os.environ.get("ADAPTDIFF_CKPT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Atomic file-system primitives
# ----------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _KillMidway:
    """A file wrapper that passes the ``during:<file>`` kill point once part of it is written."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name, self.written = f, name, 0

    def write(self, data) -> int:
        if self.written:
            _kill_point(f"during:{self.name}")
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_stream(path: Path, write: Callable[[Any], None]) -> None:
    """Create ``path``, let ``write(file)`` fill it (streamed: no second copy in memory), and
    fsync it."""
    with open(path, "wb") as f:
        write(_KillMidway(f, path.name.split(".tmp-")[0].lstrip(".")))
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, payload: bytes) -> None:
    half = len(payload) // 2

    def write(f) -> None:
        f.write(payload[:half])
        f.write(payload[half:])

    _write_stream(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)``: temporary file in the same directory, fsync,
    rename over ``path``, fsync the directory. On any error the temporary file is removed and
    ``path`` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)


def _write_safetensors(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    # Serialised in memory first (one host copy of the weights), then written in two halves.
    _write_bytes(path, safetensors_bytes(dict(state_dict)))


def _write_torch(path: Path, obj: Any) -> None:
    _write_stream(path, lambda f: torch.save(obj, f))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _for_safetensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views); give every later
    # alias its own copy. Loading copies into the model, so tied weights stay tied.
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    model_state: Mapping[str, torch.Tensor],
    train_state: dict[str, Any],
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and point ``<parent>/latest`` at it.

    ``train_state`` must load with ``torch.load(weights_only=True)`` (tensors, numbers,
    strings, lists, tuples, dicts). If ``path`` already exists it is replaced; during the swap
    the old copy briefly sits next to it under a hidden name.
    """
    path = Path(path)
    parent = path.parent
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _kill_point("start")
        tmp.mkdir()
        files = {MODEL_FILE: model_state}
        if ema_state is not None:
            files[EMA_FILE] = ema_state
        digests = {}
        for name, state_dict in files.items():
            _write_safetensors(tmp / name, _for_safetensors(state_dict))
            digests[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            _kill_point(f"after:{name}")
        state = dict(train_state, format_version=FORMAT_VERSION, files=digests)
        _write_torch(tmp / STATE_FILE, state)
        _kill_point(f"after:{STATE_FILE}")
        _fsync_path(tmp)
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            _kill_point("mid_swap")
        os.replace(tmp, path)
        _fsync_path(parent)
        _kill_point("after_swap")
        atomic_write(parent / LATEST_FILE, lambda p: _write_bytes(p, f"{path.name}\n".encode()))
    except OSError as e:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous copy back
            old = None
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {e.strerror or e} "
            f"({errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__}); "
            "the previous checkpoint is kept"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _kill_point("done")
    return path


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``<out_dir>/latest`` names, or None when there is none."""
    pointer = Path(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if name and "/" not in name and not (Path(out_dir) / name).exists():
        _restore_swapped(Path(out_dir), name)
    if not name or "/" in name or not (Path(out_dir) / name).is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory")
    return Path(out_dir) / name


def _restore_swapped(out_dir: Path, name: str) -> None:
    """A crash between the two renames that replace a checkpoint left it as ``.<name>.old-*``:
    move it back."""
    olds = sorted(out_dir.glob(f".{name}.old-*"))
    if len(olds) == 1 and (olds[0] / STATE_FILE).is_file():
        try:
            os.replace(olds[0], out_dir / name)
        except FileNotFoundError:  # another rank resuming from the same out_dir was first
            pass


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint directory, else the one its ``latest`` names."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"no checkpoint at {path}: expected a directory holding {STATE_FILE} "
        f"or an output directory holding '{LATEST_FILE}'"
    )


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path / STATE_FILE} is truncated or corrupted and cannot be read ({e})"
        ) from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / STATE_FILE} is not an adaptdiff training state "
            f"(format_version {FORMAT_VERSION} expected)"
        )
    return state


def _load_weights_file(path: Path, name: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    expected = state["files"].get(name)
    file = path / name
    if expected is None:
        raise CheckpointError(f"checkpoint {path} has no {name}")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{file} is {size} bytes, {expected['bytes']} were written: truncated or corrupted"
        )
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(f"{file} does not match the sha256 recorded at save: corrupted")
    try:
        return load_file(str(file))
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} cannot be read as safetensors ({e})") from e


def load_checkpoint(
    path: str | os.PathLike, *, ema: bool = True
) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Read and verify a checkpoint: returns (directory, model_state, ema_state, train_state).

    ``path`` is a checkpoint directory or an output directory (its ``latest`` is followed).
    Nothing is applied to any model here; see :func:`check_matches` and :func:`load_weights`.
    """
    path = resolve_checkpoint(path)
    state = _load_state(path)
    model_state = _load_weights_file(path, MODEL_FILE, state)
    ema_state = None
    if ema and EMA_FILE in state["files"]:
        ema_state = _load_weights_file(path, EMA_FILE, state)
    return path, model_state, ema_state, state


def check_matches(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, *, dtypes: bool = True
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the module's names and
    shapes (and dtypes, when ``dtypes``). Lists the differences."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    for k, v in expected.items():
        if k not in state_dict:
            continue
        got = state_dict[k]
        if tuple(got.shape) != tuple(v.shape):
            problems.append(f"{k}: checkpoint {list(got.shape)} vs model {list(v.shape)}")
        elif dtypes and got.dtype != v.dtype:
            problems.append(f"{k}: checkpoint {got.dtype} vs model {v.dtype}")

    def head(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    lines = []
    if missing:
        lines.append(f"missing from the checkpoint: {head(missing)}")
    if unexpected:
        lines.append(f"not in the model: {head(unexpected)}")
    if problems:
        lines.append(f"shape/dtype mismatches: {head(problems)}")
    if lines:
        raise CheckpointError(
            f"{what} does not match the model (another architecture or config?); "
            + "; ".join(lines)
        )


def load_weights(module: nn.Module, path: str | os.PathLike, *, which: str = "ema") -> nn.Module:
    """Load the ``"ema"`` or ``"model"`` weights of a checkpoint into ``module`` (e.g. for
    sampling), after verifying the files and the architecture. Falls back to nothing: asking for
    ``"ema"`` from a checkpoint without EMA raises."""
    if which not in ("ema", "model"):
        raise ValueError(f"load_weights: which must be 'ema' or 'model', got {which!r}")
    path, model_state, ema_state, _ = load_checkpoint(path, ema=which == "ema")
    state_dict = model_state if which == "model" else ema_state
    if state_dict is None:
        raise CheckpointError(f"checkpoint {path} holds no EMA weights")
    name = EMA_FILE if which == "ema" else MODEL_FILE
    check_matches(module, state_dict, str(path / name), dtypes=False)
    module.load_state_dict(state_dict)
    return module
