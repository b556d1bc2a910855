"""MDT: the Masked Diffusion Transformer (Gao et al., "Masked Diffusion Transformer is a Strong
Image Synthesizer", ICCV 2023, arXiv 2303.14389), built from :mod:`adaptdiff.models.dit`'s pieces.

An MDT is a DiT whose ``depth`` blocks are split into an *encoder* (the first
``depth - decode_layers``) and a *decoder* (the last ``decode_layers``), plus one extra block, the
*side-interpolator*, used only in training. Two passes:

- **Full pass** ``model(x, t, y)`` (what :func:`adaptdiff.samplers.sample` calls): patch-embed,
  add the fixed sin-cos position embedding, run the encoder, add the decoder's own (learnable)
  position embedding, run the decoder and the final layer. No token is dropped; the
  side-interpolator is not used. This is a DiT with one extra position embedding.
- **Masked pass** ``model(x, t, y, mask_ratio=r)``: each sample keeps a random
  ``floor(N * (1 - r))`` of its N tokens (argsort of uniform noise, as MAE and MDT do); only the
  kept tokens go through the encoder (selected with :func:`adaptdiff.ops.gather_tokens`). The
  side-interpolator then appends the learnable ``mask_token`` for the dropped positions, puts
  every token back in place, adds the decoder position embedding, runs its block and keeps its
  output only at the dropped positions (``side * mask + x * (1 - mask)``); the decoder runs on
  all N tokens.

Training sums the diffusion loss of both passes (:class:`adaptdiff.train.mdt.MDTObjective`,
which draws ``r = mask_ratio + mask_ratio_span * U(0, 1)`` once per step). This is MDTv1's
macro-structure; MDTv2's long U-Net skips between encoder blocks, its dense input skips into
the decoder and the relative position bias in attention are not built.

Structure as in DiT: ``model.blocks`` (an ``nn.ModuleList`` of ``DiTBlock``) holds the encoder
blocks followed by the decoder blocks, so hooks and accelerators that walk ``model.blocks``
see the full pass as they see a DiT's; ``model.sideblock`` is the side-interpolator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import gather_tokens
from .dit import DiT, DiTBlock, DiTConfig, get_2d_sincos_pos_embed

__all__ = ["MDT", "MDTConfig", "MDT_CONFIGS", "create_mdt", "random_masking"]


@dataclass
class MDTConfig(DiTConfig):
    """A :class:`DiTConfig` (defaults: MDT-XL/2) plus the masking options.

    ``decode_layers`` of the ``depth`` blocks form the decoder (MDT-XL/2: 26 encoder blocks,
    2 decoder blocks); the side-interpolator is one more block. The mask ratio of a training
    step is ``mask_ratio + mask_ratio_span * U(0, 1)`` (MDT: 0.3 + 0.2 U). DTR and mixture of
    experts are DiT options MDT does not support.
    """

    decode_layers: int = 2
    mask_ratio: float = 0.3
    mask_ratio_span: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.decode_layers < self.depth:
            raise ValueError(
                f"MDTConfig: decode_layers must be in [1, depth={self.depth}), "
                f"got {self.decode_layers}"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"MDTConfig: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_ratio_span < 0 or self.mask_ratio + self.mask_ratio_span >= 1.0:
            raise ValueError(
                f"MDTConfig: mask_ratio_span must be >= 0 with mask_ratio + mask_ratio_span < 1, "
                f"got {self.mask_ratio_span} (mask_ratio {self.mask_ratio})"
            )
        if self.dtr:
            raise ValueError("MDTConfig: dtr is not supported by MDT")
        if self.num_experts:
            raise ValueError("MDTConfig: num_experts must be 0 (MDT has no MoE option)")


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random per-sample keep set of ``floor(num_tokens * (1 - mask_ratio))`` tokens.

    Returns ``(keep [B, K], restore [B, N], mask [B, N])``: ``keep`` the kept token indices
    (in the random order of the argsort; gather with it), ``restore`` the permutation that puts
    ``cat([kept tokens, N - K mask tokens])`` back in place, and ``mask`` 1.0 at the dropped
    positions and 0.0 at the kept ones.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"random_masking: mask_ratio must be in [0, 1), got {mask_ratio}")
    if batch < 1 or num_tokens < 1:
        raise ValueError(
            f"random_masking: batch and num_tokens must be positive, got {batch}, {num_tokens}"
        )
    keep_count = max(int(num_tokens * (1.0 - mask_ratio)), 1)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    shuffle = noise.argsort(dim=1)  # (B, N): a random order; its first K are kept
    restore = shuffle.argsort(dim=1)  # (B, N): the inverse permutation
    keep = shuffle[:, :keep_count]  # (B, K)
    mask = torch.ones(batch, num_tokens, device=noise.device)
    mask[:, :keep_count] = 0.0
    mask = torch.gather(mask, 1, restore)  # back to token order: 1 where dropped
    return keep, restore, mask


class MDT(DiT):
    """Masked Diffusion Transformer (see the module docstring). Called like :class:`DiT`:
    ``model(x, t, y)`` is the full pass; ``model(x, t, y, mask_ratio=r)`` the masked one."""

    config: MDTConfig

    def __init__(self, config: MDTConfig):
        if not isinstance(config, MDTConfig):
            raise TypeError(f"MDT: config must be an MDTConfig, got {type(config).__name__}")
        super().__init__(config)
        D = config.hidden_size
        self.sideblock = DiTBlock(D, config.num_heads, config.mlp_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, D))
        self.initialize_weights()

    @property
    def num_encoder_blocks(self) -> int:
        return self.config.depth - self.config.decode_layers

    def initialize_weights(self):
        super().initialize_weights()
        if not hasattr(self, "sideblock"):  # DiT.__init__'s call, before the MDT parts exist
            return
        for module in self.sideblock.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.sideblock.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.sideblock.adaLN_modulation[-1].bias)
        nn.init.normal_(self.mask_token, std=0.02)
        grid = self.grid_size
        with torch.no_grad():
            self.decoder_pos_embed.copy_(
                get_2d_sincos_pos_embed(self.config.hidden_size, grid, grid)[None]
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
        *,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        x: (B, C, H, W) with H = W = input_size (the decoder position embedding is learned for
           the training grid)
        t: (B,) or () timesteps in the sampler's units; y, force_drop_ids: as in DiT
        mask_ratio: None for the full pass; otherwise the fraction of tokens dropped per sample
        generator: draws the masked positions (masked pass only)
        returns: (B, C_out, H, W)
        """
        B, H, W = self._check_inputs(x, t, y, force_drop_ids)
        if H != self.config.input_size or W != self.config.input_size:
            raise ValueError(
                f"MDT: x must be {self.config.input_size}x{self.config.input_size} (the "
                f"training grid), got {H}x{W}"
            )
        if mask_ratio is not None and not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MDT: mask_ratio must be None or in [0, 1), got {mask_ratio}")
        t = t.expand(B) * self.config.time_scale  # (B,)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.embed_condition(t, y, force_drop_ids)  # (B, D)
        encoder = self.blocks[: self.num_encoder_blocks]
        decoder = self.blocks[self.num_encoder_blocks :]
        if mask_ratio is None:
            for block in encoder:
                h = block(h, c)
            h = h + self.decoder_pos_embed
        else:
            N = h.shape[1]
            keep, restore, mask = random_masking(
                B, N, mask_ratio, generator=generator, device=h.device
            )
            h = gather_tokens(h, keep)  # (B, K, D): the encoder sees the kept tokens only
            for block in encoder:
                h = block(h, c)
            h = self._side_interpolate(h, c, restore, mask.to(h.dtype))
        for block in decoder:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return self.unpatchify(h, self.grid_size, self.grid_size)

    def _side_interpolate(self, h, c, restore, mask):
        """Kept tokens (B, K, D) -> all N tokens: mask tokens put in the dropped places, the
        side block's output used at those places only."""
        B, K, D = h.shape
        fill = self.mask_token.to(h.dtype).expand(B, restore.shape[1] - K, D)
        h = gather_tokens(torch.cat([h, fill], dim=1), restore)  # (B, N, D) in token order
        h = h + self.decoder_pos_embed
        side = self.sideblock(h, c)
        mask = mask.unsqueeze(-1)  # (B, N, 1): 1 where dropped
        return side * mask + h * (1 - mask)


_PAPER_SIZES = {  # MDT's sizes follow DiT's Table 1; the decoder is the last 2 blocks
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

MDT_CONFIGS: dict[str, MDTConfig] = {
    f"MDT-{size}/2": MDTConfig(patch_size=2, **dims) for size, dims in _PAPER_SIZES.items()
}
# For tests: 8x8x4 inputs, 10 classes, 1 encoder + 1 decoder block.
MDT_CONFIGS["MDT-tiny/2"] = MDTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
    num_classes=10, frequency_embedding_size=32, decode_layers=1,
)  # fmt: skip
# For the digits (16x16, one channel, no learned variance): 64 tokens of 2x2 pixels,
# 3 encoder + 1 decoder blocks (+ the side-interpolator).
MDT_CONFIGS["MDT-digits/2"] = MDTConfig(
    input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
    num_classes=10, learn_sigma=False, decode_layers=1,
)  # fmt: skip


def create_mdt(name: str, **overrides) -> MDT:
    """A freshly initialised MDT from a named config, e.g. ``create_mdt("MDT-S/2",
    num_classes=0, time_scale=1000)``."""
    if name not in MDT_CONFIGS:
        raise ValueError(f"create_mdt: unknown name {name!r}; choose from {list(MDT_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(MDTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_mdt: unknown MDTConfig fields {unknown}")
    return MDT(dataclasses.replace(MDT_CONFIGS[name], **overrides))
