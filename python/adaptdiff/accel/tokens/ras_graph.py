"""RAS steps replayed from CUDA graphs: :class:`RASStepGraph` wraps the model that ``sample``
calls; on a RAS step it captures the model call once per static shape and replays it after.

A RAS step has static shapes: the active-token count of each step comes from the schedule
(:func:`~adaptdiff.accel.tokens.ras.skip_schedule`, host integers fixed before sampling), the
selection writes into index buffers kept per count, and the K/V caches are buffers that every
dense step refills in place. So the model call of a RAS step reads only memory that stays put:
the active index, the K/V caches, and the inputs, which this wrapper copies into its own static
tensors before a replay. The selection (``before_model``) and the merge (``after_model``) run
outside the graph, on the device, without host synchronisation.

Usage (CUDA only; not yet run on a GPU)::

    ras = RAS(model, RASConfig(sample_ratio=0.5))
    graphed = RASStepGraph(model, ras)
    x = sample(graphed, shape, method="euler", steps=28, prediction="flow",
               cond={"y": y}, accelerators=[ras])

Dense steps run the model as it is. One graph is kept per (input shapes, dtypes, active count,
buffer addresses); a new shape (batch, resolution, a step of the dynamic ramp with another
count) captures a new graph, and :meth:`RASStepGraph.reset` drops them all (needed after
``ras.release()``). ``capture=False`` runs every call eagerly (the same results, on any device).

Limits: only the model's own tensor arguments are copied (a tensor the model reads from
elsewhere must stay the same object); with an accelerator that may change the model batch
between calls (adaptive guidance, per-sample step skipping) a RAS step is refused (their
per-call Python work would not replay); other hooks on the same model (``accel.apply``'s
caches and schedules) are untested with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ras import RAS

__all__ = ["RASStepGraph"]


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    inputs: list  # the static tensors the graph reads, in the order of _tensors()
    output: torch.Tensor  # the static output the graph writes


def _flatten(args, kwargs) -> tuple[list, tuple]:
    """(tensors, structure): the tensor arguments in order, and a hashable description of the
    call (the non-tensor values, the tensors' shapes, dtypes and devices)."""
    tensors, spec = [], []
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            spec.append((name, "tensor", tuple(value.shape), value.dtype, str(value.device)))
        else:
            try:
                hash(value)
            except TypeError as e:
                raise TypeError(
                    f"RASStepGraph: argument {name!r} must be a tensor or hashable, "
                    f"got {type(value).__name__}"
                ) from e
            spec.append((name, "value", value))
    return tensors, tuple(spec)


def _rebuild(args, kwargs, tensors) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their tensors replaced by ``tensors`` (same order)."""
    it = iter(tensors)
    new_args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in args)
    new_kwargs = {}
    for name, value in sorted(kwargs.items()):
        new_kwargs[name] = next(it) if isinstance(value, torch.Tensor) else value
    return new_args, new_kwargs


def _pointers(value) -> tuple:
    items = value if isinstance(value, tuple) else (value,)
    return tuple(t.data_ptr() for t in items)


class RASStepGraph(torch.nn.Module):
    """``model`` with its RAS-step calls captured into CUDA graphs and replayed.

    ``model``: what ``sample`` calls (the model ``ras`` hooks, or a module that calls it);
    ``ras``: the :class:`~adaptdiff.accel.tokens.ras.RAS` passed to the same ``sample`` call.
    ``capture``: False runs every call eagerly (for a CPU run or a check); True needs CUDA
    tensors and raises otherwise. The model must return one tensor.
    """

    def __init__(self, model: torch.nn.Module, ras: RAS, *, capture: bool = True):
        super().__init__()
        if not isinstance(ras, RAS):
            raise TypeError(f"RASStepGraph: ras must be a RAS, got {type(ras).__name__}")
        if not isinstance(capture, bool):
            raise TypeError(f"RASStepGraph: capture must be a bool, got {type(capture).__name__}")
        self.model, self.capture = model, capture
        self.__dict__["ras"] = ras  # not a submodule: RAS is no nn.Module
        self._graphs: dict = {}
        self._pool = None
        self.captures = 0  # graphs captured so far
        self.replays = 0  # RAS-step calls answered by a replay

    def reset(self) -> None:
        """Drop every captured graph (the next RAS step captures again)."""
        self._graphs.clear()
        self._pool = None

    def forward(self, *args, **kwargs):
        state = self.ras.state
        if not self.capture:
            return self.model(*args, **kwargs)
        tensors, spec = _flatten(args, kwargs)
        devices = sorted({t.device.type for t in tensors})
        if devices != ["cuda"]:
            raise RuntimeError(
                "RASStepGraph: capture=True replays CUDA graphs and needs CUDA tensors, got "
                f"tensors on {devices}; pass capture=False to run the model eagerly"
            )
        if state.mode != "ras":
            return self.model(*args, **kwargs)
        if not state.plain_batch:
            raise RuntimeError(
                "RASStepGraph: an accelerator of this sampling call may change the model batch "
                "between calls (adaptive guidance, per-sample skipping); its per-call work does "
                "not replay from a CUDA graph. Use capture=False"
            )
        key = (
            spec,
            tuple(state.active.shape),
            state.active.data_ptr(),
            tuple((k, _pointers(v)) for k, v in state.kv.items()),
        )
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args, kwargs, tensors)
            self.captures += 1
        else:
            for static, value in zip(entry.inputs, tensors, strict=True):
                static.copy_(value)
            entry.graph.replay()
            self.replays += 1
        state.model_ran = True  # what the scatter hook says when it runs eagerly
        return entry.output.clone()

    def _capture(self, args, kwargs, tensors) -> _Graph:
        """Warm up on a side stream (a RAS call may run twice: it rewrites the same active K/V
        rows with the same values), capture, then replay once for this call's output."""
        static = [t.clone() for t in tensors]
        s_args, s_kwargs = _rebuild(args, kwargs, static)
        state = self.ras.state
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(*s_args, **s_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # the repeat of the active index for the guidance branches (index_for's memo) must be
        # made inside the graph, from the index buffer, not reused from the warm-up
        state.repeated = ()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.model(*s_args, **s_kwargs)
        state.repeated = ()
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"RASStepGraph: the model must return one tensor, got {type(output).__name__}"
            )
        graph.replay()
        return _Graph(graph, static, output)
