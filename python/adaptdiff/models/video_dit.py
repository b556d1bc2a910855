"""A small spatio-temporal DiT with factorised attention, in one file.

Each block is DiT's block (:mod:`adaptdiff.models.dit`) with one more residual branch between
its two: spatial attention within each frame, then temporal attention across the frames at each
token position, then the MLP (the factorised space/time layout of Latte's and ModelScope's
video transformers)::

    x = x + gate_msa * attn(modulate(norm1(x)))             # [B*F, N, D]: within a frame
    x = x + gate_tmp * temporal_attn(modulate(norm_t(x)) + frame_pos)   # [B*N, F, D]
    x = x + gate_mlp * mlp(modulate(norm2(x)))

The spatial parts have DiT's names and shapes (``x_embedder``, ``t_embedder``, ``y_embedder``,
``pos_embed``, ``blocks.i.attn``, ``blocks.i.mlp``, ``blocks.i.adaLN_modulation``,
``final_layer``), so an image DiT's state dict loads into a :class:`VideoDiT` with
``strict=False`` (:meth:`VideoDiT.from_image_dit`). The temporal branch has its own adaLN
(``temporal_adaLN``, three chunks, zero-initialised like adaLN-Zero) and gets the 1-D sin-cos
frame position added to its input only, so the spatial path never sees the frame index. A
1-frame clip skips the temporal branch (there is nothing to mix): the model is then exactly
the image DiT on that frame.

Called as ``model(x [B, F, C, H, W], t [B], y [B] | None) -> [B, F, C_out, H, W]``, ``t`` in
the sampler's units (multiplied by ``config.time_scale``), one timestep and label per clip.
Adapter targets: the spatial attention is ``blocks.i.attn.{qkv,proj}``, the temporal one
``blocks.i.temporal_attn.{qkv,proj}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .dit import (
    DiTConfig,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
)
from .layers import Attention, Mlp, TimestepEmbedder, modulate

SPATIAL_ATTENTION = ["attn.qkv", "attn.proj"]  # LoRA targets (PEFT matching rule)
TEMPORAL_ATTENTION = ["temporal_attn.qkv", "temporal_attn.proj"]


@dataclass
class VideoDiTConfig:
    """Sizes of a :class:`VideoDiT`: an image :class:`~adaptdiff.models.DiTConfig`'s fields that
    apply, plus ``num_frames`` (the training clip length; any length runs)."""

    input_size: int = 16
    patch_size: int = 4
    in_channels: int = 1
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_frames: int = 8
    num_classes: int = 10  # 0: unconditional; label num_classes is the null label
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    time_scale: float = 1.0
    frequency_embedding_size: int = 256

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"VideoDiTConfig: num_frames must be >= 1, got {self.num_frames}")
        self.image_config()  # DiTConfig checks the shared fields

    def image_config(self) -> DiTConfig:
        """The image DiT with the same spatial parts."""
        fields = {f.name for f in dataclasses.fields(DiTConfig)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        try:
            return DiTConfig(**own)
        except ValueError as e:
            raise ValueError(str(e).replace("DiTConfig", "VideoDiTConfig")) from None

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


class VideoDiTBlock(nn.Module):
    """DiT's block plus a gated temporal-attention branch between attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm_t = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.temporal_attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.temporal_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, frames: int, frame_pos: torch.Tensor):
        """x: (B*F, N, D) tokens, frame-major per clip; c: (B*F, D); frame_pos: (F, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if frames > 1:
            x = x + self.temporal_branch(x, c, frames, frame_pos)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def temporal_branch(self, x, c, frames: int, frame_pos: torch.Tensor) -> torch.Tensor:
        """The gated temporal update (B*F, N, D): attention over the F frames per token."""
        BF, N, D = x.shape
        B = BF // frames
        shift, scale, gate = self.temporal_adaLN(c).chunk(3, dim=1)  # 3 x (B*F, D)
        h = modulate(self.norm_t(x), shift, scale)  # (B*F, N, D)
        h = h.reshape(B, frames, N, D) + frame_pos[None, :, None]
        h = h.transpose(1, 2).reshape(B * N, frames, D)  # token-major: attend across frames
        h = self.temporal_attn(h).reshape(B, N, frames, D).transpose(1, 2).reshape(BF, N, D)
        return gate.unsqueeze(1) * h


class VideoDiT(nn.Module):
    """Diffusion transformer over clips with factorised space/time attention (module docstring)."""

    def __init__(self, config: VideoDiTConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.grid_size = config.input_size // config.patch_size
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
            if config.num_classes > 0
            else None
        )
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size**2, D))
        self.blocks = nn.ModuleList(
            VideoDiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes if self.config.num_classes > 0 else None

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.grid_size
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.config.hidden_size, grid, grid)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every branch starts closed
            for layer in (block.adaLN_modulation[-1], block.temporal_adaLN[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @classmethod
    def from_image_dit(cls, dit: nn.Module, num_frames: int = 8) -> VideoDiT:
        """A video DiT whose spatial parts are a copy of the image DiT ``dit``'s weights and whose
        temporal branches start closed (zero gates): it first generates every frame as ``dit``
        would, independently. ``dit`` must be a dense DiT without DTR or CEP."""
        cfg = dit.config
        if cfg.num_experts or cfg.dtr or cfg.cep_gamma:
            raise ValueError("VideoDiT.from_image_dit: dit must be dense, without DTR or CEP")
        fields = {f.name for f in dataclasses.fields(VideoDiTConfig)}
        own = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
        video = cls(VideoDiTConfig(num_frames=num_frames, **own)).to(dit.pos_embed)
        missing, unexpected = video.load_state_dict(dit.state_dict(), strict=False)
        temporal = [k for k in missing if ".temporal_" not in k and ".norm_t" not in k]
        if temporal or unexpected:
            raise ValueError(
                f"VideoDiT.from_image_dit: weights do not fit: missing {temporal}, "
                f"unexpected {unexpected}"
            )
        return video

    def frame_position(self, frames: int) -> torch.Tensor:
        """(F, D) 1-D sin-cos embedding of the frame index."""
        pos = get_1d_sincos_pos_embed(self.config.hidden_size, torch.arange(frames))
        return pos.to(self.pos_embed)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c, g = self.patch_size, self.out_channels, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor | None, force_drop_ids=None):
        c = self.t_embedder(t)
        if self.y_embedder is None:
            return c
        if y is None:
            y = torch.full(t.shape, self.config.num_classes, dtype=torch.long, device=t.device)
        return c + self.y_embedder(y, self.training, force_drop_ids)

    def forward(self, x, t, y=None, force_drop_ids=None) -> torch.Tensor:
        """
        x: (B, F, C, H, W) clips, H = W = config.input_size
        t: (B,) or () timesteps in the sampler's units; y: (B,) labels or None (null label)
        returns: (B, F, C_out, H, W)
        """
        B, Fr = self._check_inputs(x, t, y)
        t = t.expand(B) * self.config.time_scale
        frames = x.flatten(0, 1)  # (B*F, C, H, W)
        h = self.x_embedder(frames) + self.pos_embed  # (B*F, N, D)
        c = self.embed_condition(t, y, force_drop_ids).repeat_interleave(Fr, 0)  # (B*F, D)
        frame_pos = self.frame_position(Fr)
        for block in self.blocks:
            h = block(h, c, Fr, frame_pos)
        h = self.final_layer(h, c)  # (B*F, N, p*p*C_out)
        return self.unpatchify(h).reshape(B, Fr, self.out_channels, *x.shape[-2:])

    def _check_inputs(self, x, t, y):
        C, S = self.in_channels, self.config.input_size
        if x.ndim != 5 or x.shape[2] != C or x.shape[3] != S or x.shape[4] != S:
            raise ValueError(f"VideoDiT: x must be [B, F, {C}, {S}, {S}], got {list(x.shape)}")
        B = x.shape[0]
        if not (t.ndim == 0 or t.shape == (B,)):
            raise ValueError(f"VideoDiT: t must have shape [{B}] or [], got {list(t.shape)}")
        if self.y_embedder is None and y is not None:
            raise ValueError("VideoDiT: y must be None for an unconditional model")
        if y is not None and (y.shape != (B,) or y.is_floating_point()):
            raise ValueError(
                f"VideoDiT: y must be integer labels of shape [{B}], got {list(y.shape)}"
            )
        return B, x.shape[1]


VIDEO_DIT_CONFIGS: dict[str, VideoDiTConfig] = {
    # For tests: 8x8 frames, 4 frames, 2 blocks of width 16.
    "VideoDiT-tiny/2": VideoDiTConfig(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=16,
        depth=2,
        num_heads=2,
        num_frames=4,
        frequency_embedding_size=32,
    ),  # fmt: skip
    # Moving digits: 8 frames of 16x16, 16 tokens of 4x4 pixels per frame, 0.34M parameters.
    "VideoDiT-digits/4": VideoDiTConfig(
        input_size=16,
        patch_size=4,
        in_channels=1,
        hidden_size=64,
        depth=3,
        num_heads=4,
        num_frames=8,
        time_scale=1000.0,
    ),  # fmt: skip
}


def create_video_dit(name: str, **overrides) -> VideoDiT:
    """A freshly initialised :class:`VideoDiT` from a named config of
    :data:`VIDEO_DIT_CONFIGS`, with ``VideoDiTConfig`` fields overridden."""
    if name not in VIDEO_DIT_CONFIGS:
        raise ValueError(
            f"create_video_dit: unknown name {name!r}; choose from {list(VIDEO_DIT_CONFIGS)}"
        )
    fields = {f.name for f in dataclasses.fields(VideoDiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_video_dit: unknown VideoDiTConfig fields {unknown}")
    return VideoDiT(dataclasses.replace(VIDEO_DIT_CONFIGS[name], **overrides))
