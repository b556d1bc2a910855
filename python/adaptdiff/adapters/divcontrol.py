"""DivControl (arXiv 2507.23620) on the DiT ControlNet: one ControlNet for many conditions,
its linear weights factored by SVD into shared and condition-specific parts, routed by the
condition's instruction.

Every ``nn.Linear`` of the ControlNet's copied blocks (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``, ``adaLN_modulation.1``) becomes an :class:`SVDLinear`: with
``W = U diag(s) V^T`` (all ``min(out, in)`` singular pairs, largest first), the first
``shared_fraction`` of them are the *learngene* (condition-agnostic) and the rest are split into
``num_tailors`` equal groups of *tailors*. A sample with gate ``g [T]`` uses

    W(c) = U_l diag(s_l) V_l^T + sum_t g_t(c) U_t diag(s_t) V_t^T

computed as ``x V -> * (s ⊙ gate expanded over each tailor's pairs) -> U^T`` per sample; W(c)
is never materialised. The gate is ``softmax`` over tailors of a small instruction encoder: an
embedding bag over the characters and character pairs of the instruction text
(:class:`InstructionEncoder`, ids from :class:`adaptdiff.data.CharTokenizer`) and a linear head.
At construction the tailors' singular values are multiplied by ``num_tailors``, so that with a
uniform gate the factored layer equals the dense one exactly.

Training (:func:`divcontrol_loss`): the flow-matching loss, plus

- *knowledge diversion*: cross-entropy pushing the gate of a training condition to its own
  tailor (``diversion_weight``);
- *representation alignment* (REPA-like): the condition tokens (``cond_embedder`` output),
  through a small projector, are pulled towards the frozen base model's first-block features of
  the clean image, by cosine similarity (``align_weight``).

Zero-shot to a held-out condition: its instruction picks the gate, nothing trains. Few-step
adaptation to a new condition: :func:`tailor_parameters` trains the tailor factors only.

Not from the paper (its split sizes and loss weights were not available): the split (learngene
fraction, one tailor per training condition), the gate encoder, the REPA target (base features
of the clean image) and the loss weights are this implementation's choices.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import CharTokenizer
from ..samplers import FlowSchedule
from .base import check_local_state, replace_module
from .controlnet import ControlledDiT, DiTControlNet

__all__ = [
    "DivControlNet",
    "InstructionEncoder",
    "SVDLinear",
    "divcontrol",
    "divcontrol_loss",
    "tailor_parameters",
]

INSTRUCTION_CHARS = " abcdefghijklmnopqrstuvwxyz,-."


class SVDLinear(nn.Module):
    """A linear layer kept as SVD factors split into learngene and tailor groups; reads the
    per-sample gate ``[B, num_tailors]`` from ``self.gate`` (set by :class:`DivControlNet`)."""

    def __init__(self, linear: nn.Linear, shared_fraction: float, num_tailors: int):
        super().__init__()
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = s.numel()
        per = int(r * (1 - shared_fraction)) // num_tailors
        if per < 1:
            raise ValueError(
                f"SVDLinear: rank {r} leaves no pair per tailor (shared_fraction "
                f"{shared_fraction}, num_tailors {num_tailors})"
            )
        shared = r - per * num_tailors
        self.shared, self.per_tailor, self.num_tailors = shared, per, num_tailors
        dtype = linear.weight.dtype
        self.u_shared = nn.Parameter(u[:, :shared].to(dtype).contiguous())
        self.s_shared = nn.Parameter(s[:shared].to(dtype).contiguous())
        self.v_shared = nn.Parameter(vh[:shared].T.to(dtype).contiguous())
        self.u_tailor = nn.Parameter(u[:, shared:].to(dtype).contiguous())
        self.s_tailor = nn.Parameter((s[shared:] * num_tailors).to(dtype).contiguous())
        self.v_tailor = nn.Parameter(vh[shared:].T.to(dtype).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.__dict__["gate"] = None

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate
        if gate is None:
            raise RuntimeError("SVDLinear: no gate set (call it through DivControlNet)")
        B = x.shape[0]
        if gate.shape != (B, self.num_tailors):
            raise ValueError(
                f"SVDLinear: gate must be [{B}, {self.num_tailors}], got {list(gate.shape)}"
            )
        v = torch.cat([self.v_shared, self.v_tailor], 1)  # (in, r)
        u = torch.cat([self.u_shared, self.u_tailor], 1)  # (out, r)
        tailor = self.s_tailor * gate.repeat_interleave(self.per_tailor, dim=1)  # (B, r_t)
        scale = torch.cat([self.s_shared.expand(B, -1), tailor], 1)  # (B, r)
        scale = scale.view(B, *([1] * (x.ndim - 2)), -1)
        out = ((x @ v) * scale) @ u.T
        return out if self.bias is None else out + self.bias

    def dense(self, gate: Tensor) -> Tensor:
        """W(c) [out, in] for one gate [T] (for tests and inspection only)."""
        tailor = self.s_tailor * gate.repeat_interleave(self.per_tailor)
        return (self.u_shared * self.s_shared) @ self.v_shared.T + (
            self.u_tailor * tailor
        ) @ self.v_tailor.T


class InstructionEncoder(nn.Module):
    """Instruction text -> gate logits [T]: the mean of learned embeddings of its characters and
    character pairs (an embedding bag), then a linear head."""

    def __init__(self, num_tailors: int, dim: int = 32):
        super().__init__()
        self.tokenizer = CharTokenizer(INSTRUCTION_CHARS)
        v = self.tokenizer.vocab_size
        self.vocab = v
        self.bag = nn.EmbeddingBag(v + v * v, dim, mode="mean")
        self.head = nn.Linear(dim, num_tailors)
        nn.init.normal_(self.bag.weight, std=0.5)
        nn.init.zeros_(self.head.bias)

    def ids(self, text: str) -> Tensor:
        """Character and pair ids of ``text`` (lowercased)."""
        chars = self.tokenizer.encode(text.lower())
        pairs = self.vocab + chars[:-1] * self.vocab + chars[1:]
        return torch.cat([chars, pairs])

    def embed(self, texts: list[str]) -> Tensor:
        ids = [self.ids(t) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        device = self.bag.weight.device
        return self.bag(torch.cat(ids).to(device), offsets.to(device))

    def forward(self, texts: list[str]) -> Tensor:
        return self.head(self.embed(texts))


class _FactoredControlNet(DiTControlNet):
    adapter_kind = None


class DivControlNet(nn.Module):
    """A :class:`DiTControlNet` with its block linears factored (see the module docstring).
    Called as the branch of a :class:`ControlledDiT`: ``(x, t, y, force_drop_ids, control=...,
    instruction=[texts] or gate=[B, T])``."""

    adapter_kind = "divcontrol"

    def __init__(self, control: DiTControlNet, num_tailors: int, shared_fraction: float = 0.5):
        super().__init__()
        if not isinstance(control, DiTControlNet):
            raise ValueError(
                f"DivControlNet: control must be a DiTControlNet, got {type(control).__name__}"
            )
        if num_tailors < 1:
            raise ValueError(f"DivControlNet: num_tailors must be >= 1, got {num_tailors}")
        if not 0.0 <= shared_fraction < 1.0:
            raise ValueError(
                f"DivControlNet: shared_fraction must be in [0, 1), got {shared_fraction}"
            )
        self.num_tailors = num_tailors
        self.shared_fraction = shared_fraction
        self.net = copy.deepcopy(control)
        # inside DivControl the copy is no adapter layer of its own (one file entry, not two)
        self.net.__class__ = _FactoredControlNet
        for name, m in list(self.net.blocks.named_modules()):
            if isinstance(m, nn.Linear):
                replace_module(self.net.blocks, name, SVDLinear(m, shared_fraction, num_tailors))
        self.instructions = InstructionEncoder(num_tailors)
        D = control.hidden_size
        self.align = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.requires_grad_(True)
        self.__dict__["last_cond_tokens"] = None  # the last forward's condition tokens

    def svd_layers(self) -> list[SVDLinear]:
        return [m for m in self.net.blocks.modules() if isinstance(m, SVDLinear)]

    def adapter_config(self) -> dict:
        return {
            **self.net.adapter_config(), "num_tailors": self.num_tailors,
            "shared_fraction": self.shared_fraction,
        }  # fmt: skip

    def gate(self, texts: list[str]) -> Tensor:
        """Softmax gate [B, T] of the instructions."""
        return self.instructions(texts).softmax(-1)

    def forward(self, x, t, y=None, force_drop_ids=None, *, control, instruction=None, gate=None):
        if (instruction is None) == (gate is None):
            raise ValueError("DivControlNet: give exactly one of instruction and gate")
        if gate is None:
            if len(instruction) != x.shape[0]:
                raise ValueError(
                    f"DivControlNet: {len(instruction)} instructions for a batch of {x.shape[0]}"
                )
            gate = self.gate(list(instruction))
        layers = self.svd_layers()
        for m in layers:
            m.__dict__["gate"] = gate.to(x.dtype)
        try:
            self.__dict__["last_cond_tokens"] = self.net.cond_embedder(control.to(x.dtype))
            return self.net(x, t, y, force_drop_ids, control=control)
        finally:
            for m in layers:
                m.__dict__["gate"] = None

    # the adapter protocol
    def adapter_state_dict(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        check_local_state("DivControlNet", sd, self.state_dict())
        self.load_state_dict(sd)

    def merged(self) -> nn.Module:
        raise ValueError(
            "DivControlNet.merged: a ControlNet is a second network, not a weight update; "
            "it cannot be merged into the base model"
        )


def divcontrol(
    controlled: ControlledDiT, num_tailors: int, shared_fraction: float = 0.5
) -> ControlledDiT:
    """A :class:`ControlledDiT` on the same frozen base whose branch is ``controlled``'s
    ControlNet factored into a :class:`DivControlNet`."""
    branch = DivControlNet(controlled.control, num_tailors, shared_fraction)
    return ControlledDiT(controlled.base, branch, controlled.conditioning_scale)


def tailor_parameters(model: ControlledDiT) -> list[nn.Parameter]:
    """Freeze everything but the tailor factors (``u_tailor``, ``s_tailor``, ``v_tailor``) and
    return them: DivControl's few-step adaptation to a new condition."""
    if not isinstance(model.control, DivControlNet):
        raise ValueError("tailor_parameters: model.control must be a DivControlNet")
    model.requires_grad_(False)
    params = []
    for m in model.control.svd_layers():
        for p in (m.u_tailor, m.s_tailor, m.v_tailor):
            p.requires_grad_(True)
            params.append(p)
    return params


def _base_features(base, x0: Tensor) -> Tensor:
    """The frozen base's first-block output on the clean image at t = 0 (B, N, D)."""
    with torch.no_grad():
        h = base.x_embedder(x0) + base.position_embedding(
            x0.shape[2] // base.patch_size, x0.shape[3] // base.patch_size
        )
        c = base.embed_condition(torch.zeros(x0.shape[0], device=x0.device))
        return base.blocks[0](h, c)


def divcontrol_loss(
    model: ControlledDiT,
    x0: Tensor,
    control: Tensor,
    *,
    instruction: list[str],
    tailor: Tensor | None = None,
    diversion_weight: float = 0.1,
    align_weight: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flow-matching loss of the DivControl model on ``x0`` under ``control`` and its
    ``instruction`` texts, plus knowledge diversion (when ``tailor [B]``, each sample's own
    tailor index, is given) and representation alignment."""
    branch = model.control
    if not isinstance(branch, DivControlNet):
        raise ValueError("divcontrol_loss: model.control must be a DivControlNet")
    schedule = FlowSchedule()
    B = x0.shape[0]
    t = schedule.sample_t(B, generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    x_t = alpha * x0 + sigma * eps
    logits = branch.instructions(list(instruction))
    pred = model(x_t, t, control=control, gate=logits.softmax(-1))
    loss = F.mse_loss(pred, eps - x0)
    if tailor is not None and diversion_weight > 0:
        loss = loss + diversion_weight * F.cross_entropy(logits, tailor)
    if align_weight > 0:
        target = _base_features(model.base, x0)
        proj = branch.align(branch.last_cond_tokens)
        loss = loss + align_weight * (1 - F.cosine_similarity(proj, target, dim=-1)).mean()
    return loss
