"""MDT's training objective: the diffusion loss of the full pass plus that of a masked pass.

:class:`MDTObjective` trains an :class:`~adaptdiff.models.mdt.MDT` (Gao et al., arXiv
2303.14389). Each call draws one set of timesteps for the batch and, as MDT's training loop
does, scores the model twice at those timesteps with fresh noise each time: once on all tokens
(``model(x_t, t, **cond)``) and once with a mask ratio ``r = mask_ratio + mask_ratio_span * U(0,
1)`` drawn once per call (``model(x_t', t, **cond, mask_ratio=r)``); the loss is the sum. The
masked pass is cheaper than the full one (its encoder sees ``floor(N (1 - r))`` tokens), so a
step costs less than two full forwards and backwards but more than one.

It is a ``loss_fn`` for :class:`~adaptdiff.train.Trainer`: ``Trainer(model, objective, data,
...)`` calls ``objective(model, batch)`` with ``batch`` the clean images, or ``(images, labels)``
for a class-conditional model.
"""

from __future__ import annotations

import torch

from ..samplers.parameterization import check_prediction
from .objectives import noised_mse

__all__ = ["MDTObjective"]


class MDTObjective:
    """MSE diffusion loss of the full pass plus that of a masked pass (see the module docstring).

    Args:
        schedule: an ``adaptdiff.samplers`` ``VPSchedule`` or ``FlowSchedule``.
        prediction: "eps", "v", "x0" or "flow" (velocity eps - x0).
        mask_ratio, mask_ratio_span: the per-call ratio is ``mask_ratio + mask_ratio_span *
            U(0, 1)``; None takes the model config's (MDT: 0.3 and 0.2).
        masked_weight: the masked pass's loss is multiplied by this (MDT: 1).

    After each call ``last`` holds the two terms as floats: ``{"full", "masked",
    "mask_ratio"}``.
    """

    def __init__(
        self,
        schedule,
        prediction: str = "eps",
        *,
        mask_ratio: float | None = None,
        mask_ratio_span: float | None = None,
        masked_weight: float = 1.0,
    ):
        check_prediction(prediction)
        if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
            raise ValueError(
                f"MDTObjective: mask_ratio must be None or in [0, 1), got {mask_ratio}"
            )
        if mask_ratio_span is not None and (
            mask_ratio_span < 0 or (mask_ratio or 0.0) + mask_ratio_span >= 1.0
        ):
            raise ValueError(
                "MDTObjective: mask_ratio_span must be None or >= 0 with mask_ratio + "
                f"mask_ratio_span < 1, got {mask_ratio_span} (mask_ratio {mask_ratio})"
            )
        if masked_weight < 0:
            raise ValueError(f"MDTObjective: masked_weight must be >= 0, got {masked_weight}")
        self.schedule = schedule
        self.prediction = prediction
        self.mask_ratio = mask_ratio
        self.mask_ratio_span = mask_ratio_span
        self.masked_weight = masked_weight
        self.last: dict[str, float] = {}

    def draw_ratio(self, model, generator: torch.Generator | None = None) -> float:
        """This step's mask ratio ``mask_ratio + mask_ratio_span * U(0, 1)``."""
        config = getattr(getattr(model, "module", model), "config", None)
        low = (
            self.mask_ratio if self.mask_ratio is not None else getattr(config, "mask_ratio", None)
        )
        span = self.mask_ratio_span
        if span is None:
            span = getattr(config, "mask_ratio_span", None)
        if low is None or span is None:
            raise ValueError(
                "MDTObjective: the model has no mask_ratio/mask_ratio_span in its config; "
                "pass them to MDTObjective"
            )
        u = float(torch.rand((), generator=generator))
        ratio = low + span * u
        if ratio >= 1.0:
            raise ValueError(f"MDTObjective: mask ratio {ratio:.3f} must stay below 1")
        return ratio

    def loss(
        self,
        model,
        x0: torch.Tensor,
        *,
        cond: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar loss (full + masked_weight * masked) of ``model`` on the clean batch ``x0``."""
        b = x0.shape[0]
        cond = cond or {}
        t = self.schedule.sample_t(b, generator=generator, device=x0.device)
        alpha, sigma = self.schedule.alpha_sigma(t)
        ratio = self.draw_ratio(model, generator)
        full = self._term(model, x0, t, alpha, sigma, cond, generator, None)
        masked = self._term(model, x0, t, alpha, sigma, cond, generator, ratio)
        self.last = {"full": float(full.detach()), "masked": float(masked.detach()),
                     "mask_ratio": ratio}  # fmt: skip
        return full + self.masked_weight * masked

    def _term(self, model, x0, t, alpha, sigma, cond, generator, ratio):
        def call(x_t):
            if ratio is None:
                return model(x_t, t, **cond)
            return model(x_t, t, **cond, mask_ratio=ratio, generator=generator)

        who = "MDTObjective: "
        return noised_mse(call, x0, alpha, sigma, self.prediction, generator, who).mean()

    def __call__(self, model, batch) -> torch.Tensor:
        """The :class:`~adaptdiff.train.Trainer` ``loss_fn``: ``batch`` is the clean images,
        or ``(images, labels)`` (the labels passed as ``y``)."""
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise ValueError(
                    "MDTObjective: batch must be images or (images, labels), "
                    f"got {len(batch)} items"
                )
            return self.loss(model, batch[0], cond={"y": batch[1]})
        return self.loss(model, batch)
