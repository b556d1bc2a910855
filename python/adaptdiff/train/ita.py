"""Training and sampling recipe of :class:`~adaptdiff.models.ita_mdt.ITAInpainter` on the
digits' inpainting triples (:class:`~adaptdiff.data.inpainting.InpaintingData`).

- :func:`condition`: the model's keyword arguments for a batch of triples (``masked``,
  ``mask``, and the reference and its SRE crop when the model reads them);
- :func:`train_inpainter`: flow matching (velocity target ``eps - x0``, as the other digits
  studies) on the full target image, Adam with a 20-step warm-up, gradient clipping at 1; the
  reference encoder is trained jointly with the DiT;
- :func:`inpaint`: sample the target with a flow sampler and paste the kept pixels back
  (``mask * sample + (1 - mask) * masked``), the usual inpainting composite.
"""

from __future__ import annotations

import time

import torch

from ..data.inpainting import InpaintingData, Triples
from ..models.ita_mdt import ITAInpainter, salient_crops
from ..samplers import FlowSchedule, sample
from .objectives import DiffusionObjective

__all__ = ["SplitCrops", "condition", "inpaint", "train_inpainter"]


class SplitCrops:
    """The SRE crops of every image of an :class:`InpaintingData` split, computed once
    (:func:`~adaptdiff.models.ita_mdt.salient_crops`) and looked up by reference index."""

    def __init__(self, data: InpaintingData):
        self.crops = salient_crops(data.images)

    def __call__(self, triples: Triples) -> torch.Tensor:
        return self.crops[triples.reference_index]


def condition(model: ITAInpainter, triples: Triples, crops=None) -> dict:
    """``model``'s keyword arguments for ``triples``; ``crops`` (a :class:`SplitCrops`, or any
    callable ``triples -> [B, 1, S, S]`` crops of the references) is needed by ``"itafa_sre"``."""
    cond = {"masked": triples.masked, "mask": triples.mask}
    mode = model.config.reference
    if mode != "none":
        cond["reference"] = triples.reference
    if mode == "itafa_sre":
        if crops is None:
            raise ValueError("condition: crops (SplitCrops) are required with 'itafa_sre'")
        cond["reference_crop"] = crops(triples)
    return cond


def train_inpainter(
    model: ITAInpainter,
    data: InpaintingData,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    generator: torch.Generator | None = None,
    crops=None,
) -> dict:
    """Train ``model`` in place for ``steps`` Adam steps; returns ``{"losses": [...],
    "seconds": ...}`` (one loss per step)."""
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"train_inpainter: steps must be >= 0, batch_size >= 1 and lr > 0, got "
            f"{steps}, {batch_size}, {lr}"
        )
    if model.config.reference == "itafa_sre" and crops is None:
        crops = SplitCrops(data)
    objective = DiffusionObjective(FlowSchedule(), prediction="flow")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        triples = data.batch(batch_size, generator)
        loss = objective.loss(
            model, triples.target, cond=condition(model, triples, crops), generator=generator
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def inpaint(
    model: ITAInpainter,
    triples: Triples,
    *,
    crops=None,
    method: str = "euler",
    steps: int = 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The inpainted targets ``[B, 1, S, S]`` in [-1, 1]: sampled, the kept pixels pasted
    back from ``triples.masked``."""
    model.eval()
    out = sample(
        model, tuple(triples.target.shape), method=method, steps=steps,
        cond=condition(model, triples, crops), prediction="flow", generator=generator,
        progress=False,
    ).clamp(-1, 1)  # fmt: skip
    return triples.mask * out + (1 - triples.mask) * triples.masked
