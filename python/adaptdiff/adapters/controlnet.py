"""ControlNet for DiT: a trainable copy of the first N blocks steering a frozen DiT.

The structure of PixArt-δ's ControlNet-Transformer and diffusers' ``SD3ControlNetModel``:

- the control branch owns copies of the base model's patch embedding, timestep embedding,
  label embedding and first ``num_blocks`` blocks (initialised from the base weights);
- the condition image is patch-embedded by ``cond_embedder`` (zero-initialised, diffusers'
  ``pos_embed_input``) and added to the copy's input tokens;
- the output of copy block i goes through ``controlnet_blocks[i]`` (a zero-initialised
  ``Linear(D, D)``) and is added to the output of the frozen block i
  (``DiT.forward(..., block_residuals=...)``).

At initialisation every injected residual is exactly zero, so the controlled model equals the
base model; only the control branch trains.

:class:`ControlledDiT` is the model to train and sample: ``model(x, t, y=None,
force_drop_ids=None, control=None)``; ``control=None`` runs the base model alone. The base
stays in eval mode (no label dropout or CEP noise of its own); in training the wrapper draws the
classifier-free-guidance label dropout once and hands the same ``force_drop_ids`` to the base and
to the control branch.

:class:`DiTControlNet` follows the adapter protocol (:mod:`.base`): ``adapter_kind
"controlnet"``, so :func:`~.base.save_adapter` / :func:`~.base.load_adapter` store just the
branch. It cannot be merged (it is a second network, not a weight delta): ``merged()`` raises.

:func:`controlnet_state_dict_diffusers` writes the branch under ``SD3ControlNetModel``'s key
names where a tensor has a counterpart (see :data:`DIFFUSERS_MAP`): ``x_embedder.proj`` ->
``pos_embed.proj``, ``cond_embedder.proj`` -> ``pos_embed_input.proj``, ``t_embedder.mlp.0/2``
-> ``time_text_embed.timestep_embedder.linear_1/2``, per block ``attn.qkv`` split into
``attn.to_q/to_k/to_v``, ``attn.proj`` -> ``attn.to_out.0``, ``mlp.fc1/fc2`` ->
``ff.net.0.proj`` / ``ff.net.2``, ``adaLN_modulation.1`` -> ``norm1.linear`` (the same six
chunks in the same order) and ``controlnet_blocks.i`` as is. SD3's text stream
(``context_embedder``, ``norm1_context``, ``add_*_proj``, ``ff_context``, the pooled-text
embedder) has no counterpart in a class-conditional DiT and is not written; the class embedding
table, which SD3 lacks, is written as ``class_embedder.embedding_table.weight``.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import Tensor, nn

from ..models.dit import DiT, PatchEmbed, get_2d_sincos_pos_embed
from .base import check_local_state

__all__ = [
    "ControlledDiT",
    "DiTControlNet",
    "controlnet",
    "controlnet_state_dict_diffusers",
    "load_controlnet_diffusers",
    "save_controlnet_diffusers",
]


class DiTControlNet(nn.Module):
    """The control branch of a DiT (see the module docstring)."""

    adapter_kind = "controlnet"

    def __init__(self, base: DiT, num_blocks: int, cond_channels: int = 1):
        super().__init__()
        if not isinstance(base, DiT):
            raise ValueError(f"DiTControlNet: base must be a DiT, got {type(base).__name__}")
        cfg = base.config
        if cfg.dtr or cfg.num_experts:
            raise ValueError("DiTControlNet: DTR and MoE DiTs are not supported")
        if cfg.cross_attention_dim is not None:
            raise ValueError(
                "DiTControlNet: DiTs with cross-attention (cross_attention_dim) are not "
                "supported: the control copy's blocks would run without the text context"
            )
        if not 1 <= num_blocks <= cfg.depth:
            raise ValueError(
                f"DiTControlNet: num_blocks must be in [1, {cfg.depth}], got {num_blocks}"
            )
        if cond_channels < 1:
            raise ValueError(f"DiTControlNet: cond_channels must be >= 1, got {cond_channels}")
        self.num_blocks = num_blocks
        self.cond_channels = cond_channels
        self.patch_size = cfg.patch_size
        self.hidden_size = cfg.hidden_size
        self.time_scale = cfg.time_scale
        self.x_embedder = copy.deepcopy(base.x_embedder)
        self.t_embedder = copy.deepcopy(base.t_embedder)
        self.y_embedder = copy.deepcopy(base.y_embedder)
        self.blocks = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(num_blocks))
        D = cfg.hidden_size
        self.cond_embedder = PatchEmbed(cfg.patch_size, cond_channels, D)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(num_blocks))
        for m in [self.cond_embedder.proj, *self.controlnet_blocks]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.requires_grad_(True)

    def adapter_config(self) -> dict:
        return {"num_blocks": self.num_blocks, "cond_channels": self.cond_channels}

    def embed(self, x, t, y, force_drop_ids, control) -> tuple[Tensor, Tensor]:
        """The copy's input tokens (B, N, D) (with the condition added) and conditioning (B, D)."""
        p = self.patch_size
        grid_h, grid_w = x.shape[2] // p, x.shape[3] // p
        pos = get_2d_sincos_pos_embed(self.hidden_size, grid_h, grid_w).to(x)[None]
        h = self.x_embedder(x) + pos + self.cond_embedder(control)
        t = t.expand(x.shape[0]) * self.time_scale
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full(t.shape, self.y_embedder.num_classes, device=x.device)
            c = c + self.y_embedder(y, False, force_drop_ids)
        return h, c

    def forward(self, x, t, y=None, force_drop_ids=None, *, control: Tensor) -> list[Tensor]:
        """The residuals (B, N, D) to add after each of the first ``num_blocks`` base blocks."""
        if (
            control.ndim != 4
            or control.shape[0] != x.shape[0]
            or control.shape[1] != (self.cond_channels)
            or control.shape[2:] != x.shape[2:]
        ):
            raise ValueError(
                f"DiTControlNet: control must be [{x.shape[0]}, {self.cond_channels}, "
                f"{x.shape[2]}, {x.shape[3]}], got {list(control.shape)}"
            )
        h, c = self.embed(x, t, y, force_drop_ids, control.to(x.dtype))
        residuals = []
        for block, zero in zip(self.blocks, self.controlnet_blocks, strict=True):
            h = block(h, c)
            residuals.append(zero(h))
        return residuals

    # the adapter protocol
    def adapter_state_dict(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        check_local_state("DiTControlNet", sd, self.state_dict())
        self.load_state_dict(sd)

    def merged(self) -> nn.Module:
        raise ValueError(
            "DiTControlNet.merged: a ControlNet is a second network, not a weight update; "
            "it cannot be merged into the base model"
        )


class ControlledDiT(nn.Module):
    """A frozen DiT steered by a :class:`DiTControlNet`; ``conditioning_scale`` multiplies the
    residuals (diffusers' ``controlnet_conditioning_scale``)."""

    def __init__(self, base: DiT, control: DiTControlNet, conditioning_scale: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.control = control
        self.conditioning_scale = conditioning_scale
        # what samplers and recipes read off a DiT
        self.config = base.config
        self.in_channels = base.in_channels
        self.null_label = base.null_label

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen: its label dropout is drawn here, CEP stays off
        return self

    def forward(self, x, t, y=None, force_drop_ids=None, control=None, **branch_kwargs) -> Tensor:
        """``control=None``: the base alone; ``branch_kwargs`` go to the branch (DivControl's
        ``instruction`` or ``gate``)."""
        if control is None:
            return self.base(x, t, y, force_drop_ids)
        base = self.base
        if (
            self.training and force_drop_ids is None and base.y_embedder is not None
            and base.y_embedder.dropout_prob > 0
        ):  # fmt: skip
            drop = torch.rand(x.shape[0], device=x.device) < base.y_embedder.dropout_prob
            force_drop_ids = drop.long()
        residuals = self.control(x, t, y, force_drop_ids, control=control, **branch_kwargs)
        if self.conditioning_scale != 1.0:
            residuals = [r * self.conditioning_scale for r in residuals]
        return base(x, t, y, force_drop_ids, block_residuals=residuals)


def controlnet(
    base: DiT, num_blocks: int, cond_channels: int = 1, conditioning_scale: float = 1.0
) -> ControlledDiT:
    """``base`` (frozen) with a new ControlNet on its first ``num_blocks`` blocks; the trainable
    parameters are ``trainable_parameters(model)`` (the branch's)."""
    return ControlledDiT(base, DiTControlNet(base, num_blocks, cond_channels), conditioning_scale)


# ---------------------------------------------------------------- diffusers' layout

_BLOCK_MAP = {
    "attn.proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
DIFFUSERS_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "cond_embedder.proj": "pos_embed_input.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
    "controlnet_blocks": "controlnet_blocks",
    "blocks": "transformer_blocks",
}  # module prefixes; per block also _BLOCK_MAP and attn.qkv -> attn.to_q/to_k/to_v


def _diffusers_key(key: str) -> str:
    for ours, theirs in DIFFUSERS_MAP.items():
        if key.startswith(ours + "."):
            rest = key[len(ours) + 1 :]
            if ours == "blocks":
                index, _, local = rest.partition(".")
                for a, b in _BLOCK_MAP.items():
                    if local.startswith(a + "."):
                        local = b + local[len(a) :]
                return f"{theirs}.{index}.{local}"
            return f"{theirs}.{rest}"
    raise KeyError(key)


def controlnet_state_dict_diffusers(control: DiTControlNet) -> dict[str, Tensor]:
    """The branch's tensors under ``SD3ControlNetModel`` key names (module docstring)."""
    out = {}
    for key, value in control.state_dict().items():
        if ".attn.qkv." in key:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[_diffusers_key(key.replace("attn.qkv", f"attn.{name}"))] = part
        else:
            out[_diffusers_key(key)] = value
    return out


def save_controlnet_diffusers(control: DiTControlNet, path: str | os.PathLike) -> None:
    """Write :func:`controlnet_state_dict_diffusers` to a safetensors file."""
    from safetensors.torch import save_file

    sd = controlnet_state_dict_diffusers(control)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    save_file(sd, os.fspath(path), metadata={"format": "pt", "adaptdiff": "dit-controlnet"})


def load_controlnet_diffusers(control: DiTControlNet, path_or_sd) -> None:
    """Load a file (or dict) in diffusers' layout into ``control`` (strict)."""
    if isinstance(path_or_sd, dict):
        sd = path_or_sd
    else:
        from safetensors.torch import load_file

        sd = load_file(os.fspath(path_or_sd))
    expected = controlnet_state_dict_diffusers(control)
    check_local_state("load_controlnet_diffusers", sd, expected)
    ours = {}
    for key in control.state_dict():
        if ".attn.qkv." in key:
            parts = [sd[_diffusers_key(key.replace("attn.qkv", f"attn.{n}"))] for n in
                     ("to_q", "to_k", "to_v")]  # fmt: skip
            ours[key] = torch.cat(parts, dim=0)
        else:
            ours[key] = sd[_diffusers_key(key)]
    control.load_state_dict(ours)
