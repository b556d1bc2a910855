"""Validated JSON files: the one way adaptdiff reads schedules, calibrations and run metadata.

A file is a JSON object ``{"kind": ..., "version": ..., <fields>}``. :func:`load_json` checks,
before the caller sees anything, that the file parses, is of the expected kind and a version
this code reads, has every required field with the right type, nested lists of the declared
shape, and (``expect=``) values that match the model or run it is loaded for. Every failure is a
:class:`SchemaError` (a ``ValueError``) naming the file and the field. :func:`dump_json` writes
the same envelope atomically. JSON cannot carry code, so loading a user's file runs none.

    fields = {"model": Field(str), "steps": Field(int),
              "timesteps": Field(list, shape=(lambda d: d["steps"] + 1,), item=float)}
    data = load_json(path, kind="adaptdiff.schedule", versions=(1,), fields=fields,
                     expect={"model": "DiT-XL/2"})
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SchemaError(ValueError):
    """A JSON file is unreadable, of another kind or version, or misses or mistypes a field."""


@dataclass(frozen=True)
class Field:
    """One field: its JSON type (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``),
    whether it must be present, and for lists a shape and the type of the innermost items. A
    shape entry is an int (a fixed length), a string (a named length that must agree wherever
    the name recurs) or a function of the whole file (e.g. ``lambda d: d["steps"] + 1``)."""

    type: type
    required: bool = True
    shape: tuple[int | str | Callable[[dict], int], ...] | None = None
    item: type | None = None
    choices: tuple[Any, ...] | None = None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _is(value: Any, kind: type) -> bool:
    if kind is float:  # ints are numbers too; NaN/Infinity (JSON extensions) are not accepted
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_shape(where: str, value: Any, shape, item, sizes: dict[str, int], data: dict) -> None:
    if not shape:
        if item is not None and not _is(value, item):
            raise SchemaError(
                f"{where} must be {_TYPE_NAMES.get(item, item.__name__)}, got {value!r}"
            )
        return
    if not isinstance(value, list):
        raise SchemaError(f"{where} must be a list, got {type(value).__name__}")
    want, why = shape[0], ""
    if isinstance(want, str):
        want, why = sizes.setdefault(want, len(value)), f" ({shape[0]})"
    elif callable(want):
        want = want(data)
    if len(value) != want:
        raise SchemaError(f"{where} must have length {want}{why}, got {len(value)}")
    for i, v in enumerate(value):
        _check_shape(f"{where}[{i}]", v, shape[1:], item, sizes, data)


def validate(
    data: Any,
    *,
    kind: str,
    versions: Sequence[int],
    fields: Mapping[str, Field],
    expect: Mapping[str, Any] | None = None,
    source: str = "<data>",
) -> dict[str, Any]:
    """Check an already-parsed object (see :func:`load_json`); returns it."""
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: must hold a JSON object, got {type(data).__name__}")
    if data.get("kind") != kind:
        raise SchemaError(f"{source}: kind must be {kind!r}, got {data.get('kind')!r}")
    version = data.get("version")
    if not _is(version, int) or version not in versions:
        raise SchemaError(
            f"{source}: version {version!r} is not supported (this adaptdiff reads "
            f"{', '.join(map(str, versions))}); re-create the file with this version"
        )
    sizes: dict[str, int] = {}
    for name, field in fields.items():
        where = f"{source}: {name}"
        if name not in data:
            if field.required:
                raise SchemaError(f"{where} is missing (required)")
            continue
        value = data[name]
        if not _is(value, field.type):
            raise SchemaError(
                f"{where} must be {_TYPE_NAMES.get(field.type, 'a ' + field.type.__name__)}, "
                f"got {value!r}"
            )
        if field.choices is not None and value not in field.choices:
            raise SchemaError(f"{where} must be one of {list(field.choices)}, got {value!r}")
        if field.shape is not None or field.item is not None:
            _check_shape(where, value, field.shape or (), field.item, sizes, data)
    unknown = sorted(set(data) - set(fields) - {"kind", "version"})
    if unknown:
        raise SchemaError(f"{source}: unknown fields {unknown}")
    for name, want in (expect or {}).items():
        if data.get(name) != want:
            raise SchemaError(
                f"{source}: {name} is {data.get(name)!r} but this is loaded for {want!r} "
                "(a file of another model or run?)"
            )
    return data


def load_json(
    path: str | os.PathLike,
    *,
    kind: str,
    versions: Sequence[int],
    fields: Mapping[str, Field],
    expect: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Read and validate ``path``; raises FileNotFoundError or :class:`SchemaError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not UTF-8 text ({e})") from e
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e})") from e
    return validate(
        data, kind=kind, versions=versions, fields=fields, expect=expect, source=str(path)
    )


def _reject_constant(name: str):
    raise SchemaError(f"{name} is not valid JSON")


def dump_json(path: str | os.PathLike, payload: Mapping[str, Any], *, kind: str, version: int):
    """Write ``{"kind", "version", **payload}`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    text = json.dumps({"kind": kind, "version": version, **payload}, indent=2, allow_nan=False)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
