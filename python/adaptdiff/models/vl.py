"""A small vision-language block-diffusion LM (DiffusionVL-lite): image tokens prefix a
:class:`~adaptdiff.models.BlockDiffusionLM`.

:class:`PatchEncoder` cuts an image into ``patch_size`` squares, embeds each with a linear map
plus a learned position, mixes them with a few bidirectional transformer layers and projects
them into the LM's embedding space (the "connector"). :class:`VisionBlockLM` puts those
``num_image_tokens`` embeddings in front of the text's token embeddings and runs the LM's own
layers on the whole sequence, in any of the LM's layouts, so the image is simply the first
positions of the sequence:

- ``"causal"`` (the AR model): text token i sees the whole image and the text before it.
- ``"block_causal"``, ``"bd3"`` (the block-diffusion model): the image fills the first
  ``num_image_tokens / block_size`` blocks, so every text block sees all of it. In ``bd3``
  (``[x_t | x_0]``) both halves start with the clean image, as DiffusionVL's embedding-space
  layout does; the image is never masked (only text ids are corrupted by the losses).

:meth:`VisionBlockLM.bind` fixes the images and returns a module with the LM's calling
convention (``model(ids, layout=..., block_size=..., return_hidden=...)``, ``output_weight``,
``mask_token_id``), so the training losses of :mod:`adaptdiff.train` (``ar_loss``,
``sdar_loss``) apply unchanged. For decoding, :meth:`VisionBlockLM.prefix_cache` prefills the
image into a :class:`~adaptdiff.models.KVCache` with the layout the model was trained with;
``block_decode(vlm.lm, prompt, ..., prefix=cache)`` / ``ar_decode`` then decode the text with
the image as a committed, exact prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .block_lm import BlockDiffusionLM, KVCache


@dataclass
class VisionConfig:
    """Image geometry and encoder sizes; the encoder's width is the LM's ``dim``."""

    image_size: tuple[int, int] = (16, 32)  # height, width
    channels: int = 1
    patch_size: int = 8
    n_layers: int = 1  # bidirectional transformer layers over the patches (0: projection only)
    n_heads: int = 4

    def __post_init__(self) -> None:
        h, w = self.image_size
        p = self.patch_size
        if p < 1 or h < 1 or w < 1 or h % p or w % p:
            raise ValueError(
                f"VisionConfig: patch_size ({p}) must divide the image size ({h}, {w})"
            )
        if self.channels < 1 or self.n_layers < 0 or self.n_heads < 1:
            raise ValueError(
                f"VisionConfig: need channels >= 1, n_layers >= 0, n_heads >= 1; got "
                f"{self.channels}, {self.n_layers}, {self.n_heads}"
            )

    @property
    def num_patches(self) -> int:
        h, w = self.image_size
        return (h // self.patch_size) * (w // self.patch_size)


class PatchEncoder(nn.Module):
    """``images [B, C, H, W]`` -> ``[B, num_patches, dim]`` (patches in row-major order)."""

    def __init__(self, config: VisionConfig, dim: int) -> None:
        super().__init__()
        if dim % config.n_heads:
            raise ValueError(
                f"PatchEncoder: dim ({dim}) must be a multiple of n_heads ({config.n_heads})"
            )
        self.config = cfg = config
        self.patch = nn.Linear(cfg.channels * cfg.patch_size**2, dim)
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, cfg.n_heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, images: Tensor) -> Tensor:
        cfg = self.config
        want = (cfg.channels, *cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"PatchEncoder: images must be [batch, {want[0]}, {want[1]}, {want[2]}], "
                f"got {tuple(images.shape)}"
            )
        p = cfg.patch_size
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch(patches.reshape(b, (h // p) * (w // p), c * p * p).to(self.pos.dtype))
        x = x + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x))


class VisionBlockLM(nn.Module):
    """An image encoder whose tokens prefix a :class:`BlockDiffusionLM` (module docstring).

    ``vlm(images, ids, layout=..., block_size=..., return_hidden=False)`` returns the text
    positions' logits (or hidden states): ``[B, L, V]`` for ``ids [B, L]``, ``[B, 2n, V]`` in the
    ``[x_t | x_0]`` layouts, exactly as the LM alone would shape them.
    """

    def __init__(self, lm: BlockDiffusionLM, vision: VisionConfig | None = None) -> None:
        super().__init__()
        if not isinstance(lm, BlockDiffusionLM):
            raise ValueError(f"VisionBlockLM: lm must be a BlockDiffusionLM, got {type(lm)}")
        self.lm = lm
        self.vision_config = vision or VisionConfig()
        self.encoder = PatchEncoder(self.vision_config, lm.config.dim)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches

    @property
    def mask_token_id(self) -> int:
        return self.lm.mask_token_id

    @property
    def output_weight(self) -> Tensor:
        return self.lm.output_weight

    def _check_blocks(self, layout: str, block_size: int) -> None:
        n = self.num_image_tokens
        if layout != "causal" and n % block_size:
            raise ValueError(
                f"VisionBlockLM: the {n} image tokens must fill whole blocks; block_size "
                f"({block_size}) must divide {n}"
            )

    def _run(
        self,
        x: Tensor,
        layout: str,
        block_size: int,
        positions: Tensor,
        cache: KVCache | None = None,
    ) -> Tensor:
        """The LM's layers and final norm on embeddings ``x [B, n, dim]``."""
        lm = self.lm
        if cache is not None and layout == "causal":
            block_size = 1
        rope = lm._rope(positions)
        for i, layer in enumerate(lm.layers):
            x = layer(x, rope, layout, block_size, cache, i, None)
        return lm.norm(x)

    def forward(
        self,
        images: Tensor,
        ids: Tensor,
        *,
        layout: str = "causal",
        block_size: int = 1,
        return_hidden: bool = False,
    ) -> Tensor:
        lm = self.lm
        if ids.dim() != 2 or images.shape[0] != ids.shape[0]:
            raise ValueError(
                f"VisionBlockLM: ids must be [batch, length] with the images' batch "
                f"({images.shape[0]}), got {tuple(ids.shape)}"
            )
        if layout not in ("causal", "block_causal", "bd3", "context_causal"):
            raise ValueError(f"VisionBlockLM: unknown layout {layout!r}")
        if block_size < 1:
            raise ValueError(f"VisionBlockLM: block_size must be >= 1, got {block_size}")
        self._check_blocks(layout, block_size)
        img = self.encoder(images)
        n_img = img.shape[1]
        if layout in ("bd3", "context_causal"):
            if ids.shape[1] % 2:
                raise ValueError(
                    f"VisionBlockLM: layout {layout!r} takes [x_t | x_0], an even length; got "
                    f"{ids.shape[1]}"
                )
            n = ids.shape[1] // 2
            emb = lm.tok_embeddings(ids)
            x = torch.cat([img, emb[:, :n], img, emb[:, n:]], 1)
            positions = torch.arange(n_img + n, device=ids.device).repeat(2)
            h = self._run(x, layout, block_size, positions)
            h = torch.cat([h[:, n_img : n_img + n], h[:, 2 * n_img + n :]], 1)
        else:
            x = torch.cat([img, lm.tok_embeddings(ids)], 1)
            positions = torch.arange(x.shape[1], device=ids.device)
            h = self._run(x, layout, block_size, positions)[:, n_img:]
        return h if return_hidden else lm.logits(h)

    def bind(self, images: Tensor) -> BoundImages:
        """A module that calls this model with ``images`` fixed: the LM's calling convention, for
        :func:`~adaptdiff.train.ar_loss` and :func:`~adaptdiff.train.sdar_loss`."""
        return BoundImages(self, images)

    @torch.no_grad()
    def prefix_cache(
        self, images: Tensor, *, layout: str = "block_causal", block_size: int = 1
    ) -> KVCache:
        """The images' tokens prefilled into a :class:`KVCache` (committed, capacity = their
        count) with the attention the model was trained with: ``"causal"`` for the AR model,
        ``"block_causal"`` with the decoding ``block_size`` for the block-diffusion model. Pass
        it as ``prefix=`` to ``block_decode`` / ``ar_decode`` of :attr:`lm`."""
        if layout not in ("causal", "block_causal"):
            raise ValueError(
                f"VisionBlockLM.prefix_cache: layout must be 'causal' or 'block_causal', got "
                f"{layout!r}"
            )
        if block_size < 1:
            raise ValueError(
                f"VisionBlockLM.prefix_cache: block_size must be >= 1, got {block_size}"
            )
        self._check_blocks(layout, block_size)
        img = self.encoder(images)
        cache = KVCache(self.lm, img.shape[0], img.shape[1])
        positions = torch.arange(img.shape[1], device=img.device)
        self._run(img, layout, block_size, positions, cache)
        cache.commit(img.shape[1])
        return cache


class BoundImages(nn.Module):
    """A :class:`VisionBlockLM` with its images fixed (:meth:`VisionBlockLM.bind`)."""

    def __init__(self, vlm: VisionBlockLM, images: Tensor) -> None:
        super().__init__()
        self.vlm = vlm
        self.images = images

    @property
    def mask_token_id(self) -> int:
        return self.vlm.mask_token_id

    @property
    def output_weight(self) -> Tensor:
        return self.vlm.output_weight

    def forward(self, ids: Tensor, **kwargs) -> Tensor:
        return self.vlm(self.images, ids, **kwargs)
