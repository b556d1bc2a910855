"""``apply`` / ``remove`` / ``summary`` / ``context`` and the config -> hook registry."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn

from .hooks import ATTR, AccelHandle, Hook

__all__ = ["apply", "context", "get_handle", "register_config", "remove", "reset", "summary"]

HOOKS: dict[type, type[Hook]] = {}


def register_config(config_cls: type, hook_cls: type[Hook]) -> None:
    """Make :func:`apply` install ``hook_cls(config, handle)`` for instances of ``config_cls``."""
    if not (isinstance(hook_cls, type) and issubclass(hook_cls, Hook)):
        raise ValueError(f"hook_cls must be a Hook subclass, got {hook_cls!r}")
    HOOKS[config_cls] = hook_cls


def _pipeline_family(obj):
    """The pipeline family of ``obj`` when it is a diffusers pipeline (else None)."""
    from .pipelines import family_of, is_pipeline

    return family_of(obj) if is_pipeline(obj) else None


def apply(model, *configs, blocks: Sequence[str] | None = None):
    """Install the accelerations ``configs`` on ``model`` (in place) and return the handle.

    Pass the handle to ``sample(..., accelerators=[handle])``: every call starts from clean
    caches, and the sampling-level methods (AG, LinearAG, SADA, RAS) take part through it
    (model-level caches and schedules alone may run without it: call ``reset(model)`` between
    generations then). ``blocks`` names the block lists when they are not ``blocks`` /
    ``transformer_blocks`` / ``single_transformer_blocks``.

    ``model`` may also be a diffusers ``DiffusionPipeline`` of a known family
    (:mod:`.pipelines`): the hooks go on its denoiser (``pipe.transformer``) and every
    ``pipe(...)`` call then runs as one sampling run (clean state, the methods inside the
    pipeline's own loop); returns a :class:`~.pipelines.PipelineHandle`.
    """
    if not configs:
        raise ValueError("apply: give at least one config")
    if not isinstance(model, nn.Module):
        family = _pipeline_family(model)
        if family is None:
            raise ValueError(
                f"model must be an nn.Module or a diffusers pipeline, got {type(model).__name__}"
            )
        if model.__dict__.get(ATTR) is not None:
            raise ValueError(
                "apply: the pipeline already has adaptdiff.accel hooks; call "
                "adaptdiff.accel.remove(pipe) first"
            )
        from .pipelines import NOT_IN_PIPELINES, PipelineHandle

        for cfg in configs:
            reason = NOT_IN_PIPELINES.get(type(cfg).__name__)
            if reason is not None:
                raise ValueError(f"apply: {type(cfg).__name__} on {type(model).__name__}: {reason}")

        transformer = getattr(model, family.denoiser, None)
        if not isinstance(transformer, nn.Module):
            raise ValueError(
                f"apply: {type(model).__name__} has no denoiser module at "
                f"pipe.{family.denoiser} (family {family.name!r})"
            )
        handle = apply(transformer, *configs, blocks=blocks)
        try:
            owner = PipelineHandle(model, family, handle)
            owner.install()
        except BaseException:
            remove(transformer)
            raise
        return owner
    if getattr(model, ATTR, None) is not None:
        raise ValueError(
            "apply: the model already has adaptdiff.accel hooks; call "
            "adaptdiff.accel.remove(model) first"
        )
    hook_classes = []
    for cfg in configs:
        hook_cls = next((h for c, h in HOOKS.items() if isinstance(cfg, c)), None)
        if hook_cls is None:
            raise ValueError(
                f"apply: {type(cfg).__name__} is not an acceleration config (known: "
                f"{sorted(c.__name__ for c in HOOKS)})"
            )
        hook_classes.append(hook_cls)
    handle = AccelHandle(model, blocks)
    # hooks that replace a module's computation (RAS's attention) go innermost, so that the
    # others' wrappers of the same modules still run around them
    # (handle.hooks keeps the order of the configs: sample's messages name the parts in it)
    order = sorted(range(len(configs)), key=lambda i: not hook_classes[i].innermost)
    installed: dict[int, Hook] = {}
    try:
        for i in order:
            hook = hook_classes[i](configs[i], handle)
            hook.install()
            installed[i] = hook
            handle.hooks = [installed[j] for j in sorted(installed)]
    except BaseException:
        handle.remove()
        raise
    model.__dict__[ATTR] = handle  # not a submodule: keeps it out of state_dict and .to()
    return handle


def get_handle(model):
    """The handle :func:`apply` returned for ``model`` (a model or a pipeline)."""
    handle = model.__dict__.get(ATTR) if hasattr(model, "__dict__") else None
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no adaptdiff.accel hooks (call apply first)")
    return handle


def remove(model) -> None:
    """Take every hook off ``model``; it computes exactly as before :func:`apply` (a pipeline
    gets its class, its transformer's forward and ``cache_context`` back)."""
    handle = model.__dict__.pop(ATTR, None)
    if handle is not None:
        handle.remove()


def reset(model: nn.Module) -> None:
    """Clear the caches and counters of every context (done by ``sample`` via the handle)."""
    get_handle(model).reset()


def summary(model, text: bool = False):
    """Per context: model calls, hits/misses, cached steps, per-block hit rates, indicator
    percentiles (what each installed method reports).

    On a pipeline: ``{"pipeline", "family", "calls": [...]}``, one entry per ``pipe(...)`` call
    (the last 64; see :meth:`~.pipelines.PipelineHandle.summary`). ``text=True``: one line
    about the last pipeline call (or the model's contexts) instead.
    """
    handle = get_handle(model)
    if not text:
        return handle.summary()
    if hasattr(handle, "text"):
        return handle.text()
    parts = []
    for name, entry in handle.summary().items():
        parts.append(
            f"{name}: {entry['model_calls']} model calls, hit rate {entry['hit_rate']:.0%}"
        )
    return f"{type(model).__name__}: " + ("; ".join(parts) if parts else "no call yet")


@contextlib.contextmanager
def context(model, name: str):
    """``with context(model, "uncond"): model(...)`` keeps that branch's caches apart.

    Calls outside any ``with`` use the context ``"default"`` (no error, unlike diffusers), and on a
    model without hooks the ``with`` does nothing, so pipelines can always wrap their calls.
    """
    handle = getattr(model, ATTR, None)
    if handle is None:
        yield
        return
    with handle.context(name):
        yield
