"""``MoEFeedForward``: DiT-MoE's sparse feed-forward (top-k SwiGLU experts + a shared expert) as
a plain ``nn.Module`` owning its weights in :func:`~adaptdiff.nn.functional.moe_swiglu`'s layout.

:class:`ExpertLayer` is what every MoE layer of the package shares (this one, the
expert-parallel one and :class:`adaptdiff.models.NoiseRoutedMoE`): the size checks, the expert
and shared-expert weights and their initialisation."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import ACTIVATIONS, ROUTERS, MoEAux, moe_swiglu


def xavier_uniform_experts_(w: torch.Tensor) -> torch.Tensor:
    """Xavier-uniform per expert matrix of a ``[E, out, in]`` stack (DiT initialises every
    nn.Linear this way; ``nn.init.xavier_uniform_`` would count E into the fans)."""
    fan_out, fan_in = w.shape[-2], w.shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class ExpertLayer(nn.Module):
    """Base of the MoE layers: sizes, expert weights ``w_gate, w_up [E, H, D]``, ``w_down
    [E, D, H]`` (``w_gate`` None for ungated experts), optional expert biases ``b_up [E, H]``,
    ``b_down [E, D]``, and shared experts ``shared_gate, shared_up [S, D]``, ``shared_down [D, S]``
    with ``S = num_shared_experts * shared_hidden``.

    A subclass calls :meth:`set_sizes` first, creates its router, then calls
    :meth:`add_expert_weights` (so the parameters are registered router first) and initialises
    the experts with :meth:`reset_expert_weights` after its router.
    """

    def set_sizes(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int,
        shared_hidden: int | None,
    ) -> None:
        """Checks and stores the sizes; ``shared_hidden`` defaults to ``2 * dim`` (DiT-MoE)."""
        owner = type(self).__name__
        for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts)):
            if value < 1:
                raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"{owner}: top_k must be in [1, {num_experts}], got {top_k}")
        if num_shared_experts < 0:
            raise ValueError(f"{owner}: num_shared_experts must be >= 0, got {num_shared_experts}")
        if shared_hidden is None:
            shared_hidden = 2 * dim
        elif shared_hidden < 1:
            raise ValueError(f"{owner}: shared_hidden must be >= 1, got {shared_hidden}")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.num_shared_experts, self.shared_hidden = num_shared_experts, shared_hidden

    def add_expert_weights(
        self, *, gated: bool = True, expert_bias: bool = False, device=None, dtype=None
    ) -> None:
        """Registers the (uninitialised) expert, expert-bias and shared-expert parameters."""
        E, H, D = self.num_experts, self.hidden, self.dim
        kw = dict(device=device, dtype=dtype)
        if gated:
            self.w_gate = nn.Parameter(torch.empty(E, H, D, **kw))
        else:
            self.register_parameter("w_gate", None)
        self.w_up = nn.Parameter(torch.empty(E, H, D, **kw))
        self.w_down = nn.Parameter(torch.empty(E, D, H, **kw))
        self.expert_bias = expert_bias
        if expert_bias:
            self.b_up = nn.Parameter(torch.zeros(E, H, **kw))
            self.b_down = nn.Parameter(torch.zeros(E, D, **kw))
        if self.num_shared_experts:
            width = self.num_shared_experts * self.shared_hidden
            self.shared_gate = nn.Parameter(torch.empty(width, D, **kw))
            self.shared_up = nn.Parameter(torch.empty(width, D, **kw))
            self.shared_down = nn.Parameter(torch.empty(D, width, **kw))

    def reset_expert_weights(self) -> None:
        """DiT-MoE's init: Xavier-uniform per expert matrix, zero expert biases."""
        for w in self.expert_weights() + list(self.shared_weights() or ()):
            if w is not None:
                xavier_uniform_experts_(w)
        if self.expert_bias:
            nn.init.zeros_(self.b_up)
            nn.init.zeros_(self.b_down)

    def expert_weights(self) -> list[nn.Parameter]:
        return [self.w_gate, self.w_up, self.w_down]

    def shared_weights(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter] | None:
        if not self.num_shared_experts:
            return None
        return self.shared_gate, self.shared_up, self.shared_down

    def sizes_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}"
        )


class MoEFeedForward(ExpertLayer):
    """Top-k mixture of bias-free SwiGLU experts, optionally plus always-on shared experts.

    Parameters: ``router_weight [E, D]``, ``w_gate, w_up [E, H, D]``, ``w_down [E, D, H]`` and,
    with shared experts, ``shared_gate, shared_up [S, D]``, ``shared_down [D, S]`` where
    ``S = num_shared_experts * shared_hidden``: the shared experts are always on and summed, so
    they are one SwiGLU of the concatenated width (DeepSeekMoE's fusion). DiT-MoE's layer is
    ``hidden=4*dim, num_experts=8 or 16, top_k=2, num_shared_experts=1`` (its code says 2 shared
    experts but builds one MLP of width ``2*dim``, the default ``shared_hidden``).

    ``forward(x [..., D]) -> [..., D]``; the routing statistics of the last call are kept in
    ``self.aux`` (a :class:`~adaptdiff.nn.functional.MoEAux`), read by :meth:`balance_loss` and
    :meth:`z_loss`. Init (DiT-MoE): Xavier-uniform experts, Kaiming-uniform(a=sqrt 5) router.

    ``activation="gelu_tanh"`` makes each routed expert DiT's dense ``Mlp`` (no ``w_gate``;
    with ``expert_bias=True`` also ``b_up [E, H]``, ``b_down [E, D]``, zero-initialised), the
    layout into which :func:`adaptdiff.models.upcycle_to_moe` copies a dense DiT's MLPs.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        num_shared_experts: int = 0,
        shared_hidden: int | None = None,
        renormalize: bool = False,
        router: str = "softmax",
        activation: str = "swiglu",
        expert_bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.set_sizes(dim, hidden, num_experts, top_k, num_shared_experts, shared_hidden)
        if router not in ROUTERS:
            raise ValueError(f"MoEFeedForward: router must be one of {ROUTERS}, got {router!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEFeedForward: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        if expert_bias and activation != "gelu_tanh":
            raise ValueError("MoEFeedForward: expert_bias needs activation='gelu_tanh'")
        self.renormalize, self.router, self.activation = renormalize, router, activation
        kw = dict(device=device, dtype=dtype)
        self.router_weight = nn.Parameter(torch.empty(num_experts, dim, **kw))
        self.add_expert_weights(gated=activation == "swiglu", expert_bias=expert_bias, **kw)
        self.aux: MoEAux | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
        self.reset_expert_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            name = type(self).__name__
            raise ValueError(f"{name}: x must be [..., {self.dim}], got {list(x.shape)}")
        y, self.aux = self.forward_tokens(x.reshape(-1, self.dim))
        return y.view(x.shape)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """The functional call on ``tokens [T, D]`` with this layer's weights: ``(y, aux)``."""
        return moe_swiglu(
            tokens,
            self.router_weight,
            *self.expert_weights(),
            self.top_k,
            **self.routing_options(),
            activation=self.activation,
            expert_bias=(self.b_up, self.b_down) if self.expert_bias else None,
        )

    def routing_options(self) -> dict:
        """The keywords that ``moe_swiglu`` and ``moe_swiglu_ep`` share, from this layer."""
        return dict(renormalize=self.renormalize, shared=self.shared_weights(), router=self.router)

    def balance_loss(self) -> torch.Tensor:
        """``E * sum_i f_i P_i`` of the last forward (DiT-MoE scales it by 0.01)."""
        return self._last_aux().balance_loss

    def z_loss(self) -> torch.Tensor:
        """``mean logsumexp(router logits)^2`` of the last forward."""
        return self._last_aux().z_loss

    def _last_aux(self) -> MoEAux:
        if self.aux is None:
            raise RuntimeError("MoEFeedForward: no routing statistics yet; call forward first")
        return self.aux

    def extra_repr(self) -> str:
        text = f"{self.sizes_repr()}, router={self.router!r}, renormalize={self.renormalize}"
        if self.activation != "swiglu":
            text += f", activation={self.activation!r}, expert_bias={self.expert_bias}"
        if self.num_shared_experts:
            text += f", num_shared_experts={self.num_shared_experts}"
            text += f", shared_hidden={self.shared_hidden}"
        return text
