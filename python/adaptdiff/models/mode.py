"""MoDE-style noise-conditioned experts (Reuss et al., "Efficient Diffusion Transformer Policies
with Mixture of Expert Denoisers", arXiv 2412.12953) for the DiT.

:class:`NoiseRoutedMoE` routes on the timestep embedding alone, so every token of a sample uses
the same experts, and at inference the choice is a fixed function of t. Training samples the k
experts without replacement from the router's distribution (Gumbel-top-k, like MoDE's
multinomial draw); evaluation takes the arg-top-k; the chosen probabilities are renormalised.

:func:`precompute_experts` exploits that: for each layer and each sampling timestep it builds one
dense SwiGLU equal to the routed layer, ``sum_e p_e expert_e(x) (+ shared(x))``: gate and up
rows of the chosen experts (and the shared expert) concatenated, each expert's down columns
scaled by its probability ``p_e``. (MoDE's released code averages the cached experts uniformly,
which differs from what it trained; this fusion is exact.) Gate/up concatenations are built once
per distinct expert set.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import ops
from ..nn.functional import MoEAux, expert_swiglu, routing_aux, swiglu
from ..nn.moe import ExpertLayer


def _key(t: float) -> float:
    """Cache key of a timestep (in model units, i.e. after ``time_scale``)."""
    return round(float(t), 3)


class NoiseRoutedMoE(ExpertLayer):
    """Top-k SwiGLU experts chosen per sample from the noise-level embedding (MoDE).

    Parameters: router ``router_gate, router_up [R, D]``, ``router_down [E, R]`` (MoDE's SwiGLU
    router MLP, ``R = D``); experts ``w_gate, w_up [E, H, D]``, ``w_down [E, D, H]``; optional
    shared experts ``shared_gate, shared_up [S, D]``, ``shared_down [D, S]``.

    ``forward(x [B, N, D]) -> [B, N, D]`` reads ``self.noise_level = (t [B], t_emb [B, D])``,
    which the DiT sets before calling its blocks. ``self.aux`` holds the routing statistics of
    the last routed call (``counts`` are token assignments).
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
        router_hidden: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.set_sizes(dim, hidden, num_experts, top_k, num_shared_experts, shared_hidden)
        router_hidden = router_hidden or dim
        kw = dict(device=device, dtype=dtype)
        self.router_gate = nn.Parameter(torch.empty(router_hidden, dim, **kw))
        self.router_up = nn.Parameter(torch.empty(router_hidden, dim, **kw))
        self.router_down = nn.Parameter(torch.empty(num_experts, router_hidden, **kw))
        self.add_expert_weights(**kw)
        self.noise_level: tuple[torch.Tensor, torch.Tensor] | None = None
        self.aux: MoEAux | None = None
        # {timestep key: (w_gate [kH(+S), D], w_up, w_down [D, kH(+S)])}, set by precompute.
        self.fused: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.router_weights():
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.reset_expert_weights()

    def route(self, t_emb: torch.Tensor):
        """``(logits, probs [B, E] float32, top_p [B, K] renormalised, top_idx [B, K])``:
        Gumbel-top-k (sampling without replacement) in training, arg-top-k in eval."""
        logits = swiglu(t_emb.to(self.router_gate.dtype), *self.router_weights()).float()
        log_probs = logits.log_softmax(-1)
        scores = log_probs
        if self.training:
            u = torch.rand_like(log_probs).clamp_(1e-20, 1.0)
            scores = log_probs - (-u.log()).log()  # + Gumbel(0, 1)
        top_idx = scores.topk(self.top_k, dim=-1).indices
        probs = log_probs.exp()
        top_p = probs.gather(-1, top_idx)
        return logits, probs, top_p / top_p.sum(-1, keepdim=True), top_idx

    def router_weights(self):
        return self.router_gate, self.router_up, self.router_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"NoiseRoutedMoE: x must be [B, N, {self.dim}], got {list(x.shape)}")
        if self.noise_level is None:
            raise RuntimeError(
                "NoiseRoutedMoE: no noise level; the DiT sets noise_level before its blocks"
            )
        t, t_emb = self.noise_level
        if self.fused is not None and not self.training:
            y = self._fused_forward(x, t)
            if y is not None:
                return y
        B, N, D = x.shape
        logits, probs, top_p, top_idx = self.route(t_emb)
        flat = x.reshape(B * N, D)
        x_sorted, sorted_src, offsets = ops.moe_permute(
            flat, top_idx.repeat_interleave(N, 0), self.num_experts
        )
        y_sorted = expert_swiglu(x_sorted, offsets, self.w_gate, self.w_up, self.w_down)
        y = ops.moe_unpermute(y_sorted, sorted_src, top_p.repeat_interleave(N, 0))
        if self.num_shared_experts:
            y = y + swiglu(flat, *self.shared_weights())
        per_sample = torch.bincount(top_idx.flatten(), minlength=self.num_experts)
        aux = routing_aux(logits, probs, per_sample, self.top_k)  # every sample has N tokens
        self.aux = dataclasses.replace(aux, counts=per_sample * N)
        return y.view(B, N, D)

    def _fused_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """The precomputed dense SwiGLU of each sample's timestep; None when one is missing."""
        keys = [_key(v) for v in t.tolist()]
        if any(k not in self.fused for k in keys):
            return None
        if len(set(keys)) == 1:
            return swiglu(x, *self.fused[keys[0]])
        y = torch.empty_like(x)
        for k in dict.fromkeys(keys):
            rows = torch.tensor([i for i, kk in enumerate(keys) if kk == k], device=x.device)
            y[rows] = swiglu(x[rows], *self.fused[k])
        return y

    @torch.no_grad()
    def fuse(self, t_emb: torch.Tensor, set_cache: dict | None = None):
        """The dense SwiGLU ``(w_gate, w_up, w_down)`` equal to this layer at the eval routing of
        one timestep embedding ``t_emb [D]``; ``set_cache`` shares gate/up per expert set."""
        _, _, top_p, top_idx = self.route(t_emb[None])
        experts = tuple(sorted(top_idx[0].tolist()))
        order = [top_idx[0].tolist().index(e) for e in experts]
        p = top_p[0, order].to(self.w_down.dtype)
        if set_cache is None or experts not in set_cache:
            idx = torch.tensor(experts, device=self.w_gate.device)
            gate, up = self.w_gate[idx].flatten(0, 1), self.w_up[idx].flatten(0, 1)  # [kH, D]
            if self.num_shared_experts:
                gate = torch.cat([gate, self.shared_gate])
                up = torch.cat([up, self.shared_up])
            down = self.w_down[idx]  # [k, D, H]
            entry = (gate, up, down)
            if set_cache is not None:
                set_cache[experts] = entry
        gate, up, down = set_cache[experts] if set_cache is not None else entry
        scaled = (down * p[:, None, None]).permute(1, 0, 2).flatten(1)  # [D, kH]
        if self.num_shared_experts:
            scaled = torch.cat([scaled, self.shared_down], dim=1)
        return gate, up, scaled, experts

    def extra_repr(self) -> str:
        text = f"{self.sizes_repr()}, routing='noise'"
        if self.num_shared_experts:
            text += f", num_shared_experts={self.num_shared_experts}"
        if self.fused is not None:
            text += f", fused_steps={len(self.fused)}"
        return text


@dataclasses.dataclass
class FusedExperts:
    """What :func:`precompute_experts` installed; a context manager that removes it on exit."""

    layers: list[NoiseRoutedMoE]
    num_steps: int
    expert_sets: list[int]  # distinct expert sets per layer
    fused_params: int  # values held by the fused weights (gate/up shared per set)

    def remove(self) -> None:
        for layer in self.layers:
            layer.fused = None

    def __enter__(self) -> FusedExperts:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def precompute_experts(model: nn.Module, timesteps) -> FusedExperts:
    """Fuse each :class:`NoiseRoutedMoE` of a DiT into one dense SwiGLU per timestep.

    ``timesteps``: the times the sampler will call the model at, in the sampler's units (the
    model's ``config.time_scale`` is applied here, as in its forward). In eval mode the layers
    then skip routing at those times (keys rounded to 1e-3 model units); other times still
    route. Use as ``with precompute_experts(model, ts): sample(...)`` or call ``.remove()``.
    """
    layers = [m for m in model.modules() if isinstance(m, NoiseRoutedMoE)]
    if not layers:
        raise ValueError("precompute_experts: the model has no NoiseRoutedMoE layers")
    ref = layers[0].w_gate
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=ref.device).flatten()
    if t.numel() == 0:
        raise ValueError("precompute_experts: timesteps is empty")
    t = t * model.config.time_scale
    t_emb = model.t_embedder(t)  # (S, D)
    keys = [_key(v) for v in t.tolist()]
    sets, params = [], 0
    was_training = [layer.training for layer in layers]
    for layer in layers:
        layer.eval()
        set_cache, fused = {}, {}
        for k, emb in zip(keys, t_emb, strict=True):
            gate, up, down, _ = layer.fuse(emb, set_cache)
            fused[k] = (gate, up, down)
            params += down.numel()
        params += sum(g.numel() + u.numel() for g, u, _ in set_cache.values())
        layer.fused = fused
        sets.append(len(set_cache))
    for layer, training in zip(layers, was_training, strict=True):
        layer.train(training)
    return FusedExperts(layers, len(set(keys)), sets, params)
