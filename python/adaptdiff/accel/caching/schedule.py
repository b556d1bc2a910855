"""Static schedules ``[step][block][component] -> compute | reuse`` and their executor.

JSON (written by :meth:`Schedule.save`, read by :meth:`Schedule.load`)::

    {"format": "adaptdiff.schedule", "version": 1,
     "components": [["attn", "mlp"], ...],          # per block, in execution order
     "steps": 20,                                    # model calls the mask covers
     "mask": [["11", "11", ...], ["11", "10", ...], ...],  # [step][block]: one char per
                                                     # component, "1" compute, "0" reuse
     "model": {"class": ..., "blocks": ..., "parameters": ...},   # optional
     "skipped": "remove",                            # optional: what a "0" does
     "meta": {"method": "bac", ...}}                 # optional: who made it and how

``mask`` entries may also be lists of 0/1 or of "compute"/"reuse". A *step* is one model call
in a context since the last reset (Heun makes two per solver step; in ``sample``, the call's
place in the sampler's plan, so ``steps`` must equal its call count); calls past ``steps``
compute.

``skipped`` says what a component marked "0" does:

- ``"reuse"`` (the default, and what a file without the key means): it returns its output
  from the last call that computed it (ECAD's pre-gate output for DiT's ``attn``/``mlp``: the
  current step's AdaLN gate is still applied); a component with nothing cached yet, or cached
  for another batch size, computes.
- ``"remove"``: it is not run and returns zeros shaped like its output, so a residual branch
  (attention, MLP, feed-forward) adds nothing and a block whose components are all removed
  returns its input (AutoDiffusion's layer removal; exact on adaptdiff's DiT and on diffusers
  blocks whose components are residual branches). The output's shape is taken from the
  component's last computed output (its batch size from this call's input); a component
  removed before it ever ran runs once to learn it and the result is discarded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..api import register_config
from ..calibration import model_signature, read_document
from ..hooks import Hook, Part, block_rates, layout, map_tensors, merge_rows

FORMAT, VERSION = "adaptdiff.schedule", 1

__all__ = ["SKIPPED", "Schedule", "ScheduleConfig"]

SKIPPED = ("reuse", "remove")  # what a "0" in the mask does (see the module docstring)


def check_skipped(value, where: str) -> str:
    if value not in SKIPPED:
        raise ValueError(f"{where}: skipped must be one of {list(SKIPPED)}, got {value!r}")
    return value


def _parse_entry(entry, n: int, where: str) -> list[bool]:
    if isinstance(entry, str):
        if len(entry) != n or set(entry) - {"0", "1"}:
            raise ValueError(f"{where} must be {n} characters of 0/1, got {entry!r}")
        return [c == "1" for c in entry]
    if isinstance(entry, (list, tuple)) and len(entry) == n:
        out = []
        for v in entry:
            if v in (0, 1, True, False):
                out.append(bool(v))
            elif v in ("compute", "reuse"):
                out.append(v == "compute")
            else:
                raise ValueError(f"{where}: entries must be 0/1 or compute/reuse, got {v!r}")
        return out
    raise ValueError(f"{where} must be a string or list of {n} entries, got {entry!r}")


@dataclass
class Schedule:
    """``mask[step][block][component]``: True computes, False skips it: reuses the cached
    output (``skipped="reuse"``) or contributes nothing (``skipped="remove"``)."""

    components: list[list[str]]
    mask: list[list[list[bool]]]
    meta: dict | None = None
    model: dict | None = None
    skipped: str = "reuse"

    def __post_init__(self):
        check_skipped(self.skipped, "Schedule")
        self.components = [list(c) for c in self.components]
        for s, row in enumerate(self.mask):
            if len(row) != len(self.components):
                raise ValueError(
                    f"mask[{s}] has {len(row)} blocks, components has {len(self.components)}"
                )
            for b, entry in enumerate(row):
                row[b] = _parse_entry(entry, len(self.components[b]), f"mask[{s}][{b}]")

    @property
    def num_steps(self) -> int:
        return len(self.mask)

    @classmethod
    def full(cls, components: Sequence[Sequence[str]], steps: int, **kw) -> Schedule:
        """Compute everything at every step."""
        return cls(components, [[[True] * len(c) for c in components] for _ in range(steps)], **kw)

    @classmethod
    def for_model(cls, model: nn.Module, steps: int, blocks=None, **kw) -> Schedule:
        return cls.full(layout(model, blocks), steps, model=model_signature(model), **kw)

    # -- genome (ECAD): the bits of steps 1.. (step 0 always computes), step-major
    def genome(self) -> torch.Tensor:
        bits = [v for row in self.mask[1:] for entry in row for v in entry]
        return torch.tensor(bits, dtype=torch.bool)

    @classmethod
    def from_genome(cls, components, steps: int, bits, **kw) -> Schedule:
        bits = [bool(b) for b in torch.as_tensor(bits).flatten().tolist()]
        per_step = sum(len(c) for c in components)
        if len(bits) != (steps - 1) * per_step:
            raise ValueError(
                f"genome has {len(bits)} bits; {steps} steps x {per_step} components need "
                f"{(steps - 1) * per_step}"
            )
        sched = cls.full(components, steps, **kw)
        it = iter(bits)
        for row in sched.mask[1:]:
            for entry in row:
                for c in range(len(entry)):
                    entry[c] = next(it)
        return sched

    def compute_fraction(self, costs: Sequence[Sequence[float]] | None = None) -> float:
        """Computed share of the components' cost (``costs[block][component]``, default 1)."""
        done = total = 0.0
        for row in self.mask:
            for b, entry in enumerate(row):
                for c, v in enumerate(entry):
                    w = 1.0 if costs is None else float(costs[b][c])
                    total += w
                    done += w * v
        return done / total if total else 1.0

    # -- JSON
    def to_dict(self) -> dict:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "components": self.components,
            "steps": self.num_steps,
            "mask": [["".join("1" if v else "0" for v in e) for e in row] for row in self.mask],
        }
        if self.skipped != "reuse":  # files without the key reuse (format version 1)
            doc["skipped"] = self.skipped
        if self.model is not None:
            doc["model"] = self.model
        if self.meta is not None:
            doc["meta"] = self.meta
        return doc

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, source, model: nn.Module | None = None, blocks=None) -> Schedule:
        """From a path or dict; with ``model``, checks it fits (components and signature)."""
        doc, where = read_document(source, "schedule", FORMAT, VERSION)
        for key in ("components", "mask", "steps"):
            if key not in doc:
                raise ValueError(f"{where}: missing {key!r}")
        if doc["steps"] != len(doc["mask"]):
            raise ValueError(f"{where}: steps is {doc['steps']} but mask has {len(doc['mask'])}")
        try:
            sched = cls(
                doc["components"], doc["mask"], doc.get("meta"), doc.get("model"),
                doc.get("skipped", "reuse"),
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if model is not None:
            sched.check_model(model, blocks, where)
        return sched

    def check_model(self, model: nn.Module, blocks=None, where: str = "schedule") -> None:
        want = layout(model, blocks)
        if want != self.components:
            raise ValueError(
                f"{where}: components {self.components} do not match the model's {want}"
            )
        if self.model is not None:
            sig = model_signature(model)
            for key, value in sig.items():
                if key in self.model and self.model[key] != value:
                    raise ValueError(
                        f"{where}: made for a model with {key}={self.model[key]!r}, this one "
                        f"has {key}={value!r}"
                    )


@dataclass
class ScheduleConfig:
    """Run a static :class:`Schedule` (or the path / dict of one)."""

    schedule: Schedule | str | dict

    def __post_init__(self):
        if not isinstance(self.schedule, (Schedule, str, Path, dict)):
            raise ValueError(
                f"schedule must be a Schedule, a path or a dict, got {type(self.schedule).__name__}"
            )


def _batch(args, kwargs) -> int | None:
    x = args[0] if args else next(iter(kwargs.values()), None)
    return x.shape[0] if isinstance(x, torch.Tensor) and x.ndim else None


class ScheduleExecutor(Hook):
    name = "schedule"

    def install(self):
        sched = self.config.schedule
        if not isinstance(sched, Schedule):
            sched = Schedule.load(sched)
        sched.check_model(self.handle.model, self.handle.block_names)
        self.schedule = sched
        for b, (_, block) in enumerate(self.handle.blocks):
            for c, name in enumerate(sched.components[b]):
                self.handle.wrap(getattr(block, name), self._wrapper(b, c))

    def new_state(self):
        return {}  # (block, component) -> (batch, batch slots, output, previous entry)

    def parts(self, ctx) -> list[Part]:
        # made for a count of model calls; steps aside on RAS's token-subset calls
        sched = self.schedule
        return [
            Part(
                "ScheduleConfig", sched.compute_fraction() < 1.0, block_reuse=True, yields=True,
                steps=sched.num_steps, unit="calls",
            )
        ]  # fmt: skip

    def _settle(self, b: int, c: int):
        """The kept entry of (b, c), with the last computed output merged into the one before
        it when it covered some of its rows only (the merge waits until here, outside the
        compiled graph)."""
        entry = self.state.get((b, c))
        if entry is None or entry[3] is None:
            return entry
        batch, slots, out, (old_batch, old_slots, old, _) = entry
        kept_slots, kept = merge_rows(old_slots, old, slots, out)
        if kept is not out:
            batch = old_batch
        entry = self.state[(b, c)] = (batch, kept_slots, kept, None)
        return entry

    @torch.compiler.disable
    def _cached(self, b: int, c: int, batch):
        """(the output to reuse at this call or None to compute, this call's batch slots, whether
        a computed output must be merged into the kept one); counts the decision. An output
        kept for other batch rows gives the rows this call has (guidance dropped some)."""
        ctx = self.handle.ctx
        step, mask = ctx.step, self.schedule.mask
        entry = self._settle(b, c)
        hit = None
        if 0 <= step < len(mask) and not mask[step][b][c] and entry is not None:
            hit = self.handle.take_rows(entry[1], entry[0], entry[2], batch)
        ctx.count(("block", b), hit is not None)
        slots = self.handle.batch_slots()
        # keep the entry until this call's output is merged into it only when the rows differ
        merge = entry is not None and entry[1] is not None and slots is not None
        return hit, slots, merge and not torch.equal(entry[1], slots)

    @torch.compiler.disable
    def _removed(self, b: int, c: int) -> bool:
        """Whether (b, c) is removed at this call (``skipped="remove"``); counts the decision."""
        step, mask = self.handle.ctx.step, self.schedule.mask
        removed = 0 <= step < len(mask) and not mask[step][b][c]
        self.handle.ctx.count(("block", b), removed)
        return removed

    def _remove_wrapper(self, b: int, c: int):
        def component(inner, *args, **kwargs):
            if self.handle.subset_call():
                return inner(*args, **kwargs)
            batch = _batch(args, kwargs)
            key = ("shape", b, c)
            shape = tuple(args[0].shape[1:]) if args and isinstance(args[0], torch.Tensor) else None
            known = self.state.get(key)
            if not self._removed(b, c):
                out = inner(*args, **kwargs)
                self.state[key] = (
                    shape,
                    map_tensors(out, lambda v: v.new_zeros((1,) + v.shape[1:])),
                )
                return out
            if known is None or known[0] != shape:  # never ran on inputs of this shape: learn
                with torch.no_grad():  # the output's shape (the result is discarded)
                    out = inner(*args, **kwargs)
                known = self.state[key] = (
                    shape, map_tensors(out, lambda v: v.new_zeros((1,) + v.shape[1:]))
                )  # fmt: skip
            n = batch if batch is not None else 1
            return map_tensors(known[1], lambda z: z.new_zeros((n,) + z.shape[1:]))

        return component

    def _wrapper(self, b: int, c: int):
        if self.schedule.skipped == "remove":
            return self._remove_wrapper(b, c)

        def component(inner, *args, **kwargs):
            if self.handle.subset_call():
                return inner(*args, **kwargs)
            batch = _batch(args, kwargs)
            hit, slots, merge = self._cached(b, c, batch)
            if hit is not None:
                return hit
            out = inner(*args, **kwargs)
            self.state[(b, c)] = (batch, slots, out, self.state[(b, c)] if merge else None)
            return out

        return component

    def summary(self, ctx) -> dict:
        return {
            "method": "ScheduleConfig",
            "block_hit_rates": block_rates(ctx, "block", len(self.schedule.components)),
            "planned_compute_fraction": self.schedule.compute_fraction(),
            "schedule_skipped": self.schedule.skipped,
        }


register_config(ScheduleConfig, ScheduleExecutor)
