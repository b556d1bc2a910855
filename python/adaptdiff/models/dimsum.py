"""DiMSUM: a state-space (Mamba) diffusion backbone with spatial-frequency scanning, one file.

After VinAIResearch/DiMSUM (Phung et al., "DiMSUM: Diffusion Mamba", NeurIPS 2024). A
:class:`DiMSUM` is a drop-in alternative to :class:`~adaptdiff.models.DiT`: same call
``model(x [B,C,H,W], t [B], y [B] | None) -> [B, C_out, H, W]``, same patch embedding, timestep
and label embedders and final layer. Each :class:`DiMSUMBlock`:

1. ``h = RMSNorm(x)``, split along channels into ``h1`` and ``h2`` (D/2 each, as the code does).
2. Spatial branch: ``h1 + gate * Mamba(modulate(h1))`` over the patch tokens in a
   layer-dependent order (:func:`scan_order`: row-major, reversed on odd layers, column-major
   when ``layer % 4 >= 2``), undone after the scan.
3. Wavelet branch: a 2-level Haar packet (:func:`haar_packet2`) of ``modulate(h2)`` on the token
   grid: 16 sub-bands at (H/4) x (W/4); the sequence visits the coarse locations (row- or, on
   odd layers, column-major) and at each its 16 sub-band coefficients, one C-vector token each
   (clean tokens, not the reference code's channel/sub-band shuffle); ``h2 + gate * IDWT(...)``.
   With ``wavelet=False`` ("DiM") this branch is a second spatial Mamba in the reverse order.
4. Fusion: bidirectional cross-attention between the branches, ``x12 = Attn(q1, k2, v2)``,
   ``x21 = Attn(q2, k1, v1)``, then ``Linear([x12, x21])``; ``x = x + fused``.
5. ``x = x + gate * GatedMLP(modulate(RMSNorm(x)))`` (tanh-GELU GLU).

One transformer block (DiT's adaLN-Zero :class:`~adaptdiff.models.DiTBlock`, the *same* weights
every time) runs after every ``shared_attn_every`` blocks. The Mamba mixer (:class:`Mamba`)
calls :func:`adaptdiff.ops.selective_scan` (on CUDA its pure-torch reference, until the CUDA
kernel is opted in to with :func:`adaptdiff.ops.unverified_cuda`). Differences from the
reference code, on purpose: the orthonormal Haar transform (the code divides each level by 2
more), plain residuals (the code re-adds each block's normalised input) and no "conditional
Mamba" (dead code there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .dit import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, get_2d_sincos_pos_embed
from .layers import TimestepEmbedder


@dataclass
class DiMSUMConfig:
    """Sizes and options of a DiMSUM model; the defaults are the digits-scale DiMSUM-tiny."""

    input_size: int = 16
    patch_size: int = 2
    in_channels: int = 1
    hidden_size: int = 96
    depth: int = 6
    d_state: int = 8  # N, the Mamba state size
    d_conv: int = 4  # causal depthwise convolution width
    expand: int = 2  # Mamba inner width = expand * (hidden_size / 2)
    fusion_heads: int = 4  # cross-attention heads on D/2
    shared_attn_every: int = 2  # 0: no shared transformer block
    attn_heads: int = 4  # heads of the shared transformer block
    mlp_ratio: float = 4.0
    num_classes: int = 10  # 0: unconditional; label num_classes is the null label
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    time_scale: float = 1.0
    frequency_embedding_size: int = 256
    wavelet: bool = True  # False: "DiM", both branches spatial
    scan_impl: str = "auto"  # selective_scan's impl: "auto", "kernel" or "reference"

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "depth", "d_state", "d_conv"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"DiMSUMConfig: {name} must be positive, got {getattr(self, name)}"
                )
        if self.hidden_size < 8 or self.hidden_size % 8:
            raise ValueError(
                f"DiMSUMConfig: hidden_size must be a positive multiple of 8 (two half-width "
                f"branches with sin-cos position embeddings), got {self.hidden_size}"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiMSUMConfig: patch_size ({self.patch_size}) must divide input_size "
                f"({self.input_size})"
            )
        grid = self.input_size // self.patch_size
        if self.wavelet and grid % 4:
            raise ValueError(
                f"DiMSUMConfig: the token grid ({grid}x{grid}) must be a multiple of 4 for the "
                "2-level Haar packet (or set wavelet=False)"
            )
        half = self.hidden_size // 2
        if self.fusion_heads < 1 or half % self.fusion_heads:
            raise ValueError(
                f"DiMSUMConfig: fusion_heads ({self.fusion_heads}) must divide hidden_size / 2 "
                f"({half})"
            )
        if self.shared_attn_every < 0:
            raise ValueError(
                f"DiMSUMConfig: shared_attn_every must be >= 0, got {self.shared_attn_every}"
            )
        if self.shared_attn_every and (self.attn_heads < 1 or self.hidden_size % self.attn_heads):
            raise ValueError(
                f"DiMSUMConfig: attn_heads ({self.attn_heads}) must divide hidden_size "
                f"({self.hidden_size})"
            )
        if self.scan_impl not in ("auto", "kernel", "reference"):
            raise ValueError(
                f"DiMSUMConfig: scan_impl must be 'auto', 'kernel' or 'reference', "
                f"got {self.scan_impl!r}"
            )
        if self.num_classes < 0:
            raise ValueError(f"DiMSUMConfig: num_classes must be >= 0, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


DIMSUM_CONFIGS: dict[str, DiMSUMConfig] = {
    # Digits scale (16x16 pixels, patch 2: 8x8 tokens), the small-scale plan of the study.
    "DiMSUM-tiny": DiMSUMConfig(),
    "DiM-tiny": DiMSUMConfig(wavelet=False),
    # Latent scale (SD-VAE 4x32x32), the paper's sizes (DiM-B/2, DiM-L/2, DiM-XL/2).
    "DiMSUM-B/2": DiMSUMConfig(
        input_size=32,
        in_channels=4,
        hidden_size=768,
        depth=12,
        d_state=16,
        fusion_heads=8,
        shared_attn_every=4,
        attn_heads=12,
        num_classes=1000,
        learn_sigma=False,
    ),
    "DiMSUM-L/2": DiMSUMConfig(
        input_size=32,
        in_channels=4,
        hidden_size=1024,
        depth=16,
        d_state=16,
        fusion_heads=8,
        shared_attn_every=4,
        attn_heads=16,
        num_classes=1000,
    ),
    "DiMSUM-XL/2": DiMSUMConfig(
        input_size=32,
        in_channels=4,
        hidden_size=1152,
        depth=24,
        d_state=16,
        fusion_heads=8,
        shared_attn_every=4,
        attn_heads=16,
        num_classes=1000,
    ),
}


def create_dimsum(name: str, **overrides) -> DiMSUM:
    """A :class:`DiMSUM` from a named config (:data:`DIMSUM_CONFIGS`), fields overridden."""
    if name not in DIMSUM_CONFIGS:
        raise ValueError(
            f"create_dimsum: unknown config {name!r}; choose from {', '.join(DIMSUM_CONFIGS)}"
        )
    return DiMSUM(dataclasses.replace(DIMSUM_CONFIGS[name], **overrides))


#################################################################################
#                     Scan orders and the Haar wavelet packet                    #
#################################################################################


def scan_order(h: int, w: int, layer: int, device=None) -> torch.Tensor:
    """``[h*w]`` int64: the row-major token indices in the order layer ``layer`` scans them:
    row-major, column-major when ``layer % 4 >= 2``, reversed when ``layer`` is odd. Undo with
    ``torch.argsort(order)``."""
    idx = torch.arange(h * w, device=device).view(h, w)
    if layer % 4 >= 2:
        idx = idx.t()
    idx = idx.reshape(-1)
    return idx.flip(0) if layer % 2 else idx


def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """One orthonormal 2-D Haar level: ``[..., H, W] -> [..., 4, H/2, W/2]`` (LL, LH, HL, HH)."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.stack(((a + b + c + d), (a - b + c - d), (a + b - c - d), (a - b - c + d)), -3) / 2


def haar_idwt2(y: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`haar_dwt2`: ``[..., 4, h, w] -> [..., 2h, 2w]``."""
    ll, lh, hl, hh = y.unbind(-3)
    a, b = (ll + lh + hl + hh) / 2, (ll - lh + hl - hh) / 2
    c, d = (ll + lh - hl - hh) / 2, (ll - lh - hl + hh) / 2
    h, w = ll.shape[-2:]
    out = y.new_empty(*ll.shape[:-2], 2 * h, 2 * w)
    out[..., 0::2, 0::2], out[..., 0::2, 1::2] = a, b
    out[..., 1::2, 0::2], out[..., 1::2, 1::2] = c, d
    return out


def haar_packet2(x: torch.Tensor) -> torch.Tensor:
    """Two-level Haar packet: ``[..., H, W] -> [..., 16, H/4, W/4]`` (every band split again)."""
    y = haar_dwt2(haar_dwt2(x))  # [..., 4, 4, H/4, W/4]
    return y.flatten(-4, -3)


def haar_packet2_inverse(y: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`haar_packet2`."""
    return haar_idwt2(haar_idwt2(y.unflatten(-3, (4, 4))))


#################################################################################
#                               Mamba and the block                             #
#################################################################################


class Mamba(nn.Module):
    """Mamba's mixer (state-spaces/mamba ``Mamba``, the slow path): ``in_proj -> (x, z)``,
    causal depthwise conv + SiLU on x, ``x_proj -> (dt, B, C)``, ``dt_proj``, the selective scan
    with ``D`` skip, ``silu(z)`` gate and softplus steps, ``out_proj``.
    ``[B, L, d] -> [B, L, d]``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan_impl: str = "auto",
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # A = -exp(A_log) = -(1..N)
        self.D = nn.Parameter(torch.ones(self.d_inner))
        # dt = softplus(bias) log-uniform in [1e-3, 0.1], floored at 1e-4 (Mamba's init).
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp_min(1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # (B, 2 d_inner, L)
        u, z = xz.chunk(2, dim=1)
        u = F.silu(self.conv1d(u)[..., :L])  # causal: the first L outputs of the padded conv
        dt, B, C = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L), no bias
        y = ops.selective_scan(
            u.contiguous(),
            delta.contiguous(),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z.contiguous(),
            self.dt_proj.bias.float(),
            delta_softplus=True,
            impl=self.scan_impl,
        )
        return self.out_proj(y.transpose(1, 2))  # (B, L, d)


class CrossFusion(nn.Module):
    """Bidirectional cross-attention of two ``[B, N, d]`` streams, then ``Linear(2d -> 2d)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv1 = nn.Linear(dim, 3 * dim)
        self.qkv2 = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(2 * dim, 2 * dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, N, d/H)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        q1, k1, v1 = (self._heads(t) for t in self.qkv1(x1).chunk(3, dim=-1))
        q2, k2, v2 = (self._heads(t) for t in self.qkv2(x2).chunk(3, dim=-1))
        x12 = F.scaled_dot_product_attention(q1, k2, v2).transpose(1, 2).flatten(2)
        x21 = F.scaled_dot_product_attention(q2, k1, v1).transpose(1, 2).flatten(2)
        return self.proj(torch.cat([x12, x21], dim=-1))


class GatedMLP(nn.Module):
    """``fc2(gelu_tanh(a) * b)`` with ``(a, b) = fc1(x)``; hidden width ``mlp_ratio * d``."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.gelu(a, approximate="tanh") * b)


class DiMSUMBlock(nn.Module):
    """Spatial and wavelet Mamba branches on half the channels each, cross-attention fusion and
    a gated MLP, all adaLN-modulated by the condition (see the module docstring)."""

    def __init__(self, config: DiMSUMConfig, layer: int):
        super().__init__()
        D, half = config.hidden_size, config.hidden_size // 2
        self.layer = layer
        self.wavelet = config.wavelet
        self.norm1 = nn.RMSNorm(D, eps=1e-6)
        self.norm2 = nn.RMSNorm(D, eps=1e-6)
        mamba = dict(
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            scan_impl=config.scan_impl,
        )
        self.spatial = Mamba(half, **mamba)
        self.frequency = Mamba(half, **mamba)  # the wavelet branch (spatial, reversed for DiM)
        self.fusion = CrossFusion(half, config.fusion_heads)
        self.mlp = GatedMLP(D, config.mlp_ratio)
        # shift, scale, gate for each branch (D/2 each) and for the MLP (D): 6 D outputs.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def _spatial_scan(self, mixer: Mamba, h: torch.Tensor, grid: tuple[int, int], layer: int):
        order = scan_order(*grid, layer, device=h.device)
        return mixer(h[:, order])[:, torch.argsort(order)]

    def _wavelet_scan(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, C = h.shape
        gh, gw = grid
        bands = haar_packet2(h.transpose(1, 2).reshape(B, C, gh, gw))  # (B, C, 16, gh/4, gw/4)
        cells = bands.permute(0, 3, 4, 2, 1)  # (B, gh/4, gw/4, 16, C): a cell's 16 coefficients
        if self.layer % 2:  # odd layers visit the coarse cells column-first
            cells = cells.transpose(1, 2)
        seq = self.frequency(cells.reshape(B, -1, C)).view(cells.shape)
        if self.layer % 2:
            seq = seq.transpose(1, 2)
        out = haar_packet2_inverse(seq.permute(0, 4, 3, 1, 2))  # (B, C, gh, gw)
        return out.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (B, N, D) tokens of a row-major ``grid``; c: (B, D) condition."""
        half = x.shape[-1] // 2
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
        m1, m2, mlp_mod = mod.split([3 * half, 3 * half, 3 * 2 * half], dim=-1)
        shift1, scale1, gate1 = m1.chunk(3, dim=-1)
        shift2, scale2, gate2 = m2.chunk(3, dim=-1)
        shift3, scale3, gate3 = mlp_mod.chunk(3, dim=-1)
        h1, h2 = self.norm1(x).chunk(2, dim=-1)
        a1 = self._spatial_scan(self.spatial, h1 * (1 + scale1) + shift1, grid, self.layer)
        x1 = h1 + gate1 * a1
        m = h2 * (1 + scale2) + shift2
        if self.wavelet:
            a2 = self._wavelet_scan(m, grid)
        else:
            a2 = self._spatial_scan(self.frequency, m, grid, self.layer + 1)  # reverse direction
        x2 = h2 + gate2 * a2
        x = x + self.fusion(x1, x2)
        return x + gate3 * self.mlp(self.norm2(x) * (1 + scale3) + shift3)


#################################################################################
#                                  The model                                    #
#################################################################################


class DiMSUM(nn.Module):
    """DiMSUM diffusion backbone (see the module docstring); called like :class:`DiT`."""

    def __init__(self, config: DiMSUMConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_size = config.patch_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.grid_size = config.input_size // config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, config.frequency_embedding_size)
        self.y_embedder = (
            LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
            if config.num_classes > 0
            else None
        )
        pos = get_2d_sincos_pos_embed(D, self.grid_size, self.grid_size).float()
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))  # learnable, from sin-cos
        self.blocks = nn.ModuleList(DiMSUMBlock(config, i) for i in range(config.depth))
        self.shared_attn = (
            DiTBlock(D, config.attn_heads, config.mlp_ratio) if config.shared_attn_every else None
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear) and module not in self._mamba_dt_projs():
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        blocks = list(self.blocks) + ([self.shared_attn] if self.shared_attn else [])
        for block in blocks + [self.final_layer]:  # adaLN-Zero: every branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _mamba_dt_projs(self) -> list[nn.Module]:
        return [m.dt_proj for m in self.modules() if isinstance(m, Mamba)]

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def forward(self, x, t, y=None, force_drop_ids=None) -> torch.Tensor:
        """x: (B, C, H, W) at the config's input size; t: (B,) or (); y: (B,) labels or None.
        Returns (B, C_out, H, W)."""
        cfg, p = self.config, self.patch_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"DiMSUM: x must be [B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}], "
                f"got {list(x.shape)}"
            )
        B = x.shape[0]
        if not (t.ndim == 0 or t.shape == (B,)):
            raise ValueError(f"DiMSUM: t must have shape [{B}] or [], got {list(t.shape)}")
        if self.y_embedder is None and (y is not None or force_drop_ids is not None):
            raise ValueError("DiMSUM: y and force_drop_ids must be None for an unconditional model")
        if y is not None and (y.shape != (B,) or y.is_floating_point()):
            raise ValueError(
                f"DiMSUM: y must be integer labels of shape [{B}], got {y.dtype} {list(y.shape)}"
            )
        grid = (cfg.input_size // p, cfg.input_size // p)
        t = t.expand(B) * cfg.time_scale
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y, self.training, force_drop_ids)
        for i, block in enumerate(self.blocks):
            h = block(h, c, grid)
            if self.shared_attn is not None and (i + 1) % cfg.shared_attn_every == 0:
                h = self.shared_attn(h, c)
        return self.unpatchify(self.final_layer(h, c), *grid)
