"""A small ITA-MDT-style reference-guided inpainting model (after Hong et al., "ITA-MDT",
CVPR 2025, arXiv 2503.20418), sized for the digits (:mod:`adaptdiff.data.inpainting`).

- The diffusion model is a :class:`~adaptdiff.models.dit.DiT` whose input is the noisy target,
  the masked target and the mask concatenated as channels (as try-on models feed the agnostic
  person image and its mask); its patch embedding reads those 3 channels, its output is the one
  channel of the target. Every block reads the reference's tokens by cross-attention
  (``DiT(cross_attention_dim=hidden_size)``).
- :class:`ReferenceEncoder`: the condition encoder (ITA-MDT: a frozen DINOv2; here a few
  pre-norm transformer layers over the reference's patches, with a CLS token, **trained jointly
  with the DiT** from scratch, as no pretrained encoder of digits exists). It returns every
  layer's hidden states ``[B, L, T + 1, C]``.
- ``reference`` picks how the reference reaches the DiT:

  - ``"none"``: it does not (inpaint from context alone; the model has no cross-attention);
  - ``"last"``: the encoder's last layer only, through an MLP to the model width;
  - ``"itafa"``: all layers mixed by :class:`~adaptdiff.models.ita.ImageTimestepAdaptiveAggregator`
    with weights that depend on the timestep embedding and on the features' complexity;
  - ``"itafa_sre"``: as ``"itafa"``, plus a second token set from the Salient Region
    Extractor's crop of the reference (:func:`salient_crops`, resized back to the image size,
    through the same encoder and its own aggregator), as ITA-MDT adds the garment's detailed
    region; a learned embedding per set tells the two apart.

MDT's masked-token training (:mod:`adaptdiff.models.mdt`) is not used: :class:`MDT` has no
cross-attention path, so this model is trained as a plain DiT (full pass only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dit import DiT, DiTConfig, PatchEmbed
from .ita import ImageTimestepAdaptiveAggregator, crop_box, salient_region

__all__ = ["REFERENCE_MODES", "ITAInpainter", "ITAInpainterConfig", "ReferenceEncoder",
           "salient_crops"]  # fmt: skip

REFERENCE_MODES = ("none", "last", "itafa", "itafa_sre")


@dataclass
class ITAInpainterConfig:
    """Sizes of :class:`ITAInpainter` (defaults: 16x16 digits, 16 tokens of 4x4 pixels)."""

    reference: str = "itafa"
    input_size: int = 16
    patch_size: int = 4
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    encoder_dim: int = 32
    encoder_layers: int = 4
    encoder_heads: int = 4
    encoder_patch: int = 4

    def __post_init__(self):
        if self.reference not in REFERENCE_MODES:
            raise ValueError(
                f"ITAInpainterConfig: reference must be one of {REFERENCE_MODES}, "
                f"got {self.reference!r}"
            )
        sizes = ("input_size", "patch_size", "hidden_size", "depth", "num_heads", "encoder_dim",
                 "encoder_layers", "encoder_heads", "encoder_patch")  # fmt: skip
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"ITAInpainterConfig: {name} must be a positive int, got {value!r}"
                )
        if self.input_size % self.encoder_patch:
            raise ValueError(
                f"ITAInpainterConfig: encoder_patch ({self.encoder_patch}) must divide "
                f"input_size ({self.input_size})"
            )


class ReferenceEncoder(nn.Module):
    """Patch embedding + CLS + learned positions + ``layers`` pre-norm transformer layers.

    ``forward(images [B, 1, S, S]) -> [B, layers, 1 + (S / patch)^2, dim]``: every layer's output
    (the CLS token first).
    """

    def __init__(self, size: int, patch: int, dim: int, layers: int, heads: int):
        super().__init__()
        if size % patch:
            raise ValueError(f"ReferenceEncoder: patch ({patch}) must divide size ({size})")
        self.size = size
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                2 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )  # fmt: skip
            for _ in range(layers)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, self.size, self.size):
            raise ValueError(
                f"ReferenceEncoder: images must be [B, 1, {self.size}, {self.size}], "
                f"got {list(images.shape)}"
            )
        h = self.embed(images).flatten(2).transpose(1, 2)  # (B, T, C)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        states = []
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return torch.stack(states, 1)  # (B, L, T + 1, C)


def salient_crops(
    images: torch.Tensor, *, min_size: int = 8, strip_entropy: float = 3.0
) -> torch.Tensor:
    """The SRE crop of each image ``[N, 1, S, S]``, resized (bilinear) back to ``S x S``.

    The box is :func:`~adaptdiff.models.ita.salient_region`'s. ITA-MDT's border-strip threshold
    (0.8 bits) is for 8-bit photographs with flat backgrounds; the upsampled digits' 5x5
    neighbourhoods carry more than 0.8 bits almost everywhere, so that the box would always grow
    to the whole image. Here the strip threshold is 3.0 bits and the starting box 8 pixels
    (on 16x16 digits most boxes are then 10-14 pixels wide).
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"salient_crops: images must be [N, 1, H, W], got {list(images.shape)}")
    size = images.shape[-2:]
    out = []
    for image in images:
        box = salient_region(image[0], min_size=min_size, strip_entropy=strip_entropy)
        crop = crop_box(image, box)[None]
        out.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0])
    return torch.stack(out) if out else images.new_zeros(images.shape)


class ITAInpainter(nn.Module):
    """The reference-guided inpainting DiT (see the module docstring).

    ``model(x, t, *, masked, mask, reference=None, reference_crop=None) -> [B, 1, S, S]``
    with ``x`` the noisy target; ``reference`` is required unless ``config.reference ==
    "none"``, ``reference_crop`` (:func:`salient_crops` of the reference) for ``"itafa_sre"``.
    Called so by :func:`adaptdiff.samplers.sample` with ``cond={"masked": ..., "mask": ...,
    "reference": ..., "reference_crop": ...}``.
    """

    def __init__(self, config: ITAInpainterConfig | None = None):
        super().__init__()
        config = config or ITAInpainterConfig()
        self.config = config
        D = config.hidden_size
        uses_reference = config.reference != "none"
        self.dit = DiT(
            DiTConfig(
                input_size=config.input_size, patch_size=config.patch_size, in_channels=1,
                hidden_size=D, depth=config.depth, num_heads=config.num_heads, num_classes=0,
                learn_sigma=False, time_scale=1000.0, frequency_embedding_size=64,
                cross_attention_dim=D if uses_reference else None,
            )
        )  # fmt: skip
        # noisy target, masked target, mask -> D
        self.dit.x_embedder = PatchEmbed(config.patch_size, 3, D)
        w = self.dit.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.dit.x_embedder.proj.bias)
        self.encoder = None
        if uses_reference:
            C, L = config.encoder_dim, config.encoder_layers
            self.encoder = ReferenceEncoder(config.input_size, config.encoder_patch, C, L,
                                            config.encoder_heads)  # fmt: skip
        if config.reference == "last":
            self.last_proj = nn.Sequential(
                nn.Linear(C, D), nn.GELU(), nn.Linear(D, D), nn.LayerNorm(D)
            )
        if config.reference in ("itafa", "itafa_sre"):
            self.itafa = ImageTimestepAdaptiveAggregator(L, C, D, D, drop_cls=True)
        if config.reference == "itafa_sre":
            self.itafa_crop = ImageTimestepAdaptiveAggregator(L, C, D, D, drop_cls=True)
            self.set_embed = nn.Parameter(0.02 * torch.randn(2, D))

    def reference_tokens(
        self, reference: torch.Tensor, t_emb: torch.Tensor, crop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ``[B, T', D]`` tokens the DiT cross-attends to."""
        mode = self.config.reference
        features = self.encoder(reference)  # (B, L, T + 1, C)
        if mode == "last":
            return self.last_proj(features[:, -1, 1:])
        tokens = self.itafa(features, t_emb)
        if mode == "itafa":
            return tokens
        if crop is None:
            raise ValueError("ITAInpainter: reference_crop is required with reference='itafa_sre'")
        crop_tokens = self.itafa_crop(self.encoder(crop), t_emb)
        return torch.cat([tokens + self.set_embed[0], crop_tokens + self.set_embed[1]], 1)

    def layer_weights(self, reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ITAFA's ``[B, L]`` layer mix for the reference at timesteps ``t`` (sampler units)."""
        if self.config.reference not in ("itafa", "itafa_sre"):
            raise ValueError(
                f"ITAInpainter.layer_weights: needs reference='itafa' or 'itafa_sre', "
                f"got {self.config.reference!r}"
            )
        t_emb = self.dit.t_embedder(t.expand(reference.shape[0]) * self.dit.config.time_scale)
        return self.itafa.layer_weights(self.encoder(reference), t_emb)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        masked: torch.Tensor,
        mask: torch.Tensor,
        reference: torch.Tensor | None = None,
        reference_crop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        S = self.config.input_size
        for name, value in (("x", x), ("masked", masked), ("mask", mask)):
            if value.dim() != 4 or tuple(value.shape[1:]) != (1, S, S):
                raise ValueError(
                    f"ITAInpainter: {name} must be [B, 1, {S}, {S}], got {list(value.shape)}"
                )
        B = x.shape[0]
        if masked.shape[0] != B or mask.shape[0] != B:
            raise ValueError(f"ITAInpainter: masked and mask must have batch {B}")
        if not (t.ndim == 0 or t.shape == (B,)):
            raise ValueError(f"ITAInpainter: t must have shape [{B}] or [], got {list(t.shape)}")
        dit = self.dit
        t = t.expand(B) * dit.config.time_scale
        c = dit.embed_condition(t)  # (B, D): the timestep embedding
        context = {}
        if self.encoder is None and (reference is not None or reference_crop is not None):
            raise ValueError(
                "ITAInpainter: reference and reference_crop must be None with reference='none'"
            )
        if self.encoder is not None:
            if reference is None or reference.shape != x.shape:
                got = None if reference is None else list(reference.shape)
                raise ValueError(f"ITAInpainter: reference must be [{B}, 1, {S}, {S}], got {got}")
            context["encoder_hidden_states"] = self.reference_tokens(reference, c, reference_crop)
        h = dit.x_embedder(torch.cat([x, masked, mask], 1)) + dit.pos_embed
        for block in dit.blocks:
            h = block(h, c, None, **context)
        h = dit.final_layer(h, c)
        return dit.unpatchify(h, dit.grid_size, dit.grid_size)
