"""DiT: a diffusion transformer with adaLN-Zero conditioning, in one file.

After facebookresearch/DiT's ``models.py`` (Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023); parameter names match it, so its checkpoints load key for key.
Options, each off by default:

- Denoising Task Routing (DTR; Park et al., ICLR 2024, arXiv 2310.07138): each timestep t
  gets a window of ``floor(beta*D)`` channels starting at ``round((t/(T-1))^alpha * (D - w))``;
  each block's sublayers see only the window of the block input, the residual stream is whole.
- Condition-embedding perturbation (CEP; arXiv 2405.20494): during training the class
  embedding gets noise ``U(-g/sqrt(D), g/sqrt(D))`` or ``N(0, (g/sqrt(D))^2)``.
- Mixture of experts (``num_experts > 0``): every ``moe_every``-th block's ``mlp`` is sparse.
  ``moe_routing="token"`` is DiT-MoE (arXiv 2407.11633): an
  :class:`~adaptdiff.nn.MoEFeedForward` of top-k SwiGLU experts of width ``mlp_ratio*D`` plus
  shared experts of width 2D, each token routed on its own. ``"noise"`` is MoDE (arXiv
  2412.12953): a :class:`~adaptdiff.models.mode.NoiseRoutedMoE` whose router sees only the
  timestep embedding, so all tokens of a sample share their experts. The router losses of the
  last forward are summed by :func:`adaptdiff.models.moe_aux_loss` (weights
  ``moe_balance_weight``, ``moe_z_loss_weight``); ``DiffusionObjective`` adds them.
- Cross-attention to text (``cross_attention_dim``, diffusers' name: the width of the
  ``encoder_hidden_states`` tokens): every block gets a ``cross_attn`` sub-layer after its
  self-attention, PixArt-alpha style without an adaLN gate, but pre-normed
  (``norm_cross``, a LayerNorm with affine parameters) and with its output projection
  initialised to zero, so a new model starts as the DiT without it. The model is then called
  with ``encoder_hidden_states [B, L, cross_attention_dim]`` and optionally
  ``encoder_attention_mask [B, L]`` (nonzero/True: keep the token); labels still work beside
  it (``num_classes=0`` for text only).

Structure that hooks rely on (keep it): ``model.blocks`` is an ``nn.ModuleList`` of
``DiTBlock``. Each block has the submodules ``attn`` (``Attention``: ``qkv``, ``proj``,
``num_heads``, ``scale`` handed to SDPA), ``mlp`` (``fc1``, ``fc2``; or an MoE layer),
``adaLN_modulation``
and its two residual branches ``attn_branch`` and ``mlp_branch``. A branch is called as
``branch(x [B,N,D], c [B,D])`` and returns its gated update, and ``DiTBlock.forward`` is just::

    x = x + block.attn_branch(x, c)
    x = x + block.mlp_branch(x, c)

(with cross-attention, ``x = x + block.cross_attn_branch(x, encoder_hidden_states,
encoder_attention_mask)`` between the two), so a forward hook on a branch (or a module put in
its place) can read, cache or replace the update. The branches own no parameters; each calls
the block's ``adaLN_modulation`` and uses its half of the six chunks (the cross-attention
branch uses none: it is not gated). Accelerators that hook the ``attn``/``mlp`` components
leave ``cross_attn`` alone: it is computed on every call.

The model is called as ``model(x [B,C,H,W], t [B], y [B] | None) -> [B, C_out, H, W]``
(``C_out = 2C`` with ``learn_sigma``). ``t`` is in the sampler's units and is multiplied by
``config.time_scale`` first (1 for DDPM's 0..999, 1000 for flow matching's 0..1). H and W may
be any multiples of the patch size: other grids get their sin-cos position embedding computed
on the fly.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import MoEFeedForward
from ..nn.functional import ACTIVATIONS
from .layers import Attention, Mlp, TimestepEmbedder, modulate
from .mode import NoiseRoutedMoE

MOE_ROUTINGS = ("token", "noise")


@dataclass
class DiTConfig:
    """Sizes and options of a DiT; the defaults are DiT-XL/2 on 256x256 ImageNet latents."""

    input_size: int = 32  # training resolution (square), in pixels or latent cells
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: unconditional; otherwise label num_classes is the null label
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (training)
    learn_sigma: bool = True  # output 2C channels: the prediction and the variance interpolation
    time_scale: float = 1.0  # t is multiplied by this before the sinusoidal embedding
    frequency_embedding_size: int = 256
    # Denoising Task Routing: per-timestep channel windows on the block input.
    dtr: bool = False
    dtr_sharing_ratio: float = 0.8  # beta: the fraction of channels each timestep uses
    dtr_alpha: float = 4.0  # alpha: how fast the window slides with t
    dtr_num_tasks: int = 1000  # T: timesteps (in units of t * time_scale) that get windows
    # Condition-embedding perturbation (training only): 0 turns it off.
    cep_gamma: float = 0.0
    cep_noise: str = "uniform"  # "uniform" or "gaussian"
    # Mixture of experts: 0 experts is the dense DiT.
    num_experts: int = 0
    moe_top_k: int = 2
    num_shared_experts: int = 1  # always-on SwiGLU experts of width 2D (DiT-MoE: one)
    moe_every: int = 1  # block i is MoE when i % moe_every == moe_every - 1 (1: every block)
    moe_routing: str = "token"  # "token" (DiT-MoE) or "noise" (MoDE, timestep-only router)
    moe_renormalize: bool = False  # divide the top-k probabilities by their sum (MoDE: always)
    moe_activation: str = "swiglu"  # "gelu_tanh": experts are DiT's Mlp (upcycling)
    moe_expert_bias: bool = False  # biases in "gelu_tanh" experts (copies of fc1/fc2's)
    moe_balance_weight: float = 0.01  # DiT-MoE's weight of E * sum_i f_i P_i
    moe_z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE, MoDE: 1e-3)
    # Cross-attention to encoder_hidden_states of this width (None: no cross-attention).
    cross_attention_dim: int | None = None

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig: num_heads ({self.num_heads}) must divide hidden_size "
                f"({self.hidden_size})"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig: hidden_size must be a multiple of 4 (2-D sin-cos position "
                f"embedding), got {self.hidden_size}"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig: patch_size ({self.patch_size}) must divide input_size "
                f"({self.input_size})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig: num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob <= 1.0:
            raise ValueError(
                f"DiTConfig: class_dropout_prob must be in [0, 1], got {self.class_dropout_prob}"
            )
        if self.time_scale <= 0:
            raise ValueError(f"DiTConfig: time_scale must be positive, got {self.time_scale}")
        if not 0.0 < self.dtr_sharing_ratio <= 1.0:
            raise ValueError(
                f"DiTConfig: dtr_sharing_ratio must be in (0, 1], got {self.dtr_sharing_ratio}"
            )
        if self.dtr_alpha <= 0:
            raise ValueError(f"DiTConfig: dtr_alpha must be positive, got {self.dtr_alpha}")
        if self.dtr_num_tasks < 2:
            raise ValueError(f"DiTConfig: dtr_num_tasks must be >= 2, got {self.dtr_num_tasks}")
        if self.cep_gamma < 0:
            raise ValueError(f"DiTConfig: cep_gamma must be >= 0, got {self.cep_gamma}")
        if self.cep_noise not in ("uniform", "gaussian"):
            raise ValueError(
                f"DiTConfig: cep_noise must be 'uniform' or 'gaussian', got {self.cep_noise!r}"
            )
        if self.cep_gamma > 0 and self.num_classes == 0:
            raise ValueError("DiTConfig: cep_gamma > 0 needs a class-conditional model")
        if self.cross_attention_dim is not None and (
            not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim < 1
        ):
            raise ValueError(
                f"DiTConfig: cross_attention_dim must be None or a positive int, "
                f"got {self.cross_attention_dim!r}"
            )
        self._check_moe()

    def _check_moe(self):
        if self.num_experts < 0:
            raise ValueError(f"DiTConfig: num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(
                f"DiTConfig: moe_top_k must be in [1, num_experts={self.num_experts}], "
                f"got {self.moe_top_k}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(
                f"DiTConfig: num_shared_experts must be >= 0, got {self.num_shared_experts}"
            )
        if self.moe_every < 1:
            raise ValueError(f"DiTConfig: moe_every must be >= 1, got {self.moe_every}")
        if self.moe_routing not in MOE_ROUTINGS:
            raise ValueError(
                f"DiTConfig: moe_routing must be one of {MOE_ROUTINGS}, got {self.moe_routing!r}"
            )
        if self.moe_activation not in ACTIVATIONS:
            raise ValueError(
                f"DiTConfig: moe_activation must be one of {ACTIVATIONS}, "
                f"got {self.moe_activation!r}"
            )
        if self.moe_routing == "noise" and self.moe_activation != "swiglu":
            raise ValueError("DiTConfig: moe_routing 'noise' supports moe_activation 'swiglu' only")
        if self.moe_expert_bias and self.moe_activation != "gelu_tanh":
            raise ValueError("DiTConfig: moe_expert_bias needs moe_activation 'gelu_tanh'")
        for name in ("moe_balance_weight", "moe_z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiTConfig: {name} must be >= 0, got {getattr(self, name)}")

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) gets an MoE feed-forward."""
        return self.num_experts > 0 and index % self.moe_every == self.moe_every - 1

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


#################################################################################
#                Embedding layers for patches, class labels and CEP             #
#################################################################################


class PatchEmbed(nn.Module):
    """Cuts images into non-overlapping p x p patches and projects each to a token."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W/p^2, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; drops them to the null label for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # The last row is the null label (always present, so CFG works even without dropout).
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train: bool, force_drop_ids=None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


def perturb_condition(c: torch.Tensor, gamma: float, noise: str = "uniform") -> torch.Tensor:
    """CEP: ``c + xi`` with ``xi ~ U(-g/sqrt(d), g/sqrt(d))^d`` or ``N(0, (g/sqrt(d))^2)``,
    d the embedding size (the last dimension of ``c``)."""
    bound = gamma / math.sqrt(c.shape[-1])
    if noise == "uniform":
        return c + (torch.rand_like(c) * 2 - 1) * bound
    if noise == "gaussian":
        return c + torch.randn_like(c) * bound
    raise ValueError(f"perturb_condition: noise must be 'uniform' or 'gaussian', got {noise!r}")


def dtr_masks(
    t: torch.Tensor, hidden_size: int, num_tasks: int = 1000, sharing_ratio=0.8, alpha=4.0
) -> torch.Tensor:
    """Denoising Task Routing windows ``[B, hidden_size]`` (1 inside, 0 outside) for timesteps
    ``t [B]`` in task units (0..num_tasks-1; fractional t interpolates, values outside clamp):
    width ``w = floor(beta*D)``, start ``round((t/(T-1))^alpha * (D - w))``."""
    width = int(hidden_size * sharing_ratio)
    progress = (t.double() / (num_tasks - 1)).clamp(0.0, 1.0)
    start = torch.round(progress**alpha * (hidden_size - width))  # (B,), half to even like DTR's
    channel = torch.arange(hidden_size, device=t.device, dtype=torch.float64)
    inside = (channel >= start[:, None]) & (channel < start[:, None] + width)
    return inside.float()  # (B, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class _Branch(nn.Module):
    """Base of the residual branches: a parameter-free view onto its block's modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        # A back-reference, not a submodule: registering it would duplicate the block's
        # parameters in state_dict and loop. Kept in __dict__ so that deepcopy follows it.
        self.__dict__["block"] = block


class AttentionBranch(_Branch):
    """The gated attention update ``gate_msa * attn(modulate(norm1(x), shift, scale))``."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.block.adaLN_modulation(c).chunk(6, dim=1)[:3]  # 3 x (B, D)
        return gate.unsqueeze(1) * self.block.attn(modulate(self.block.norm1(x), shift, scale))


class MLPBranch(_Branch):
    """The gated feed-forward update ``gate_mlp * mlp(modulate(norm2(x), shift, scale))``."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.block.adaLN_modulation(c).chunk(6, dim=1)[3:]  # 3 x (B, D)
        return gate.unsqueeze(1) * self.block.mlp(modulate(self.block.norm2(x), shift, scale))


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (queries) to context tokens (keys and values).

    ``forward(x [B, N, D], context [B, L, context_dim], keep [B, L] bool | None)``: a sample
    whose ``keep`` row is all False attends to nothing and gets a zero update.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = None  # as Attention.scale: SDPA's default 1/sqrt(head_dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, keep=None):
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, L, head_dim)
        attn_mask, empty = None, None
        if keep is not None:
            empty = ~keep.any(1)  # (B,): rows that attend to nothing
            attn_mask = (keep | empty[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        if empty is not None and bool(empty.any()):
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


class CrossAttentionBranch(_Branch):
    """The cross-attention update ``cross_attn(norm_cross(x), context, keep)`` (no gate)."""

    def forward(self, x, encoder_hidden_states, encoder_attention_mask=None) -> torch.Tensor:
        block = self.block
        return block.cross_attn(block.norm_cross(x), encoder_hidden_states, encoder_attention_mask)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (optionally DTR-routed)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: nn.Module | None = None,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        # Cross-attention to text tokens (only when configured: otherwise no new submodules).
        self.cross_attn = None
        if cross_attention_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, cross_attention_dim, num_heads)
            self.cross_attn_branch = CrossAttentionBranch(self)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # mlp: any [B, N, D] -> [B, N, D] module (an MoE layer); default DiT's dense Mlp.
        self.mlp = mlp if mlp is not None else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.attn_branch = AttentionBranch(self)
        self.mlp_branch = MLPBranch(self)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ):
        """x: (B, N, D) tokens; c: (B, D) conditioning; mask: (B, D) DTR window or None;
        encoder_hidden_states: (B, L, cross_attention_dim) context of a cross-attention block
        (required there, refused elsewhere); encoder_attention_mask: (B, L) bool keep or None."""
        if self.cross_attn is None:
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError(
                    "DiTBlock: encoder_hidden_states given to a block without cross-attention "
                    "(DiTConfig.cross_attention_dim is None)"
                )
        elif encoder_hidden_states is None:
            raise ValueError(
                "DiTBlock: this block has cross-attention; encoder_hidden_states is required "
                "(a caller that runs DiT blocks itself must pass the text context)"
            )
        h = x if mask is None else x * mask.unsqueeze(1)
        # DTR routes the block input only: the sublayers see the task's channel window, and
        # the channels outside it pass through unchanged, i.e. x + updates(x * mask).
        h = h + self.attn_branch(h, c)  # (B, N, D)
        if self.cross_attn is not None:
            h = h + self.cross_attn_branch(h, encoder_hidden_states, encoder_attention_mask)
        h = h + self.mlp_branch(h, c)  # (B, N, D)
        if mask is None:
            return h
        return h + x * (1 - mask.unsqueeze(1))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its patch's pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Diffusion model with a transformer backbone (see the module docstring)."""

    def __init__(self, config: DiTConfig):
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
        # Fixed sin-cos position embedding for the training grid (a buffer, not trained).
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size**2, D))
        self.blocks = nn.ModuleList(
            DiTBlock(
                D, config.num_heads, config.mlp_ratio, self._moe_mlp(i), config.cross_attention_dim
            )
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()

    def _moe_mlp(self, index: int) -> nn.Module | None:
        """Block ``index``'s MoE feed-forward, or None for the dense Mlp."""
        cfg = self.config
        if not cfg.is_moe_block(index):
            return None
        D = cfg.hidden_size
        hidden = int(D * cfg.mlp_ratio)  # DiT-MoE: every routed expert as wide as DiT's Mlp
        kw = dict(num_shared_experts=cfg.num_shared_experts, shared_hidden=2 * D)
        if cfg.moe_routing == "noise":
            layer = NoiseRoutedMoE(D, hidden, cfg.num_experts, cfg.moe_top_k, **kw)
        else:
            layer = MoEFeedForward(
                D, hidden, cfg.num_experts, cfg.moe_top_k, renormalize=cfg.moe_renormalize,
                activation=cfg.moe_activation, expert_bias=cfg.moe_expert_bias, **kw,
            )  # fmt: skip
        # Read by adaptdiff.models.moe_aux_loss (which also finds them under DDP wrappers).
        layer.balance_weight = cfg.moe_balance_weight
        layer.z_loss_weight = cfg.moe_z_loss_weight
        return layer

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (for CFG); None for an unconditional model."""
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

        # Patch embedding like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every gate starts at 0, so each block starts as the identity ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Cross-attention starts closed too (its output projection is zero).
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # ... and the output starts at exactly 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, grid_h*grid_w, D): the stored one for the training grid, else computed."""
        if grid_h == grid_w == self.grid_size:
            return self.pos_embed
        pos = get_2d_sincos_pos_embed(self.config.hidden_size, grid_h, grid_w)
        return pos.to(self.pos_embed)[None]

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, grid_h*grid_w, p*p*C) tokens -> (B, C, grid_h*p, grid_w*p) images."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def embed_condition(self, t, y=None, force_drop_ids=None) -> torch.Tensor:
        """c (B, D) = t_embedder(t) + y_embedder(y) (+ CEP noise when training); t is already
        scaled by time_scale; y None in a class-conditional model means the null label."""
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is None:
            return c
        if y is None:
            y = torch.full(t.shape, self.config.num_classes, dtype=torch.long, device=t.device)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        if self.training and self.config.cep_gamma > 0:
            y_emb = perturb_condition(y_emb, self.config.cep_gamma, self.config.cep_noise)
        return c + y_emb

    def dtr_masks(self, t: torch.Tensor) -> torch.Tensor:
        """DTR windows (B, D) for timesteps t already scaled by time_scale."""
        cfg = self.config
        return dtr_masks(
            t, cfg.hidden_size, cfg.dtr_num_tasks, cfg.dtr_sharing_ratio, cfg.dtr_alpha
        )

    def forward(
        self,
        x,
        t,
        y=None,
        force_drop_ids=None,
        *,
        block_residuals=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
    ) -> torch.Tensor:
        """
        x: (B, C, H, W) images or latents, H and W multiples of patch_size
        t: (B,) or () float timesteps in the sampler's units
        y: (B,) int64 class labels; None means the null label (and must be None when the
           model is unconditional)
        force_drop_ids: (B,) 1 where the label is replaced by the null label (as in DiT)
        block_residuals: None, or a sequence of at most ``depth`` (B, N, D) tensors; entry i is
           added to the tokens after block i (a ControlNet's injection)
        encoder_hidden_states: (B, L, cross_attention_dim) text tokens; required by a model
           with cross-attention, refused by one without
        encoder_attention_mask: (B, L) 1/True where a token is kept, 0/False where dropped
        returns: (B, C_out, H, W)
        """
        B, H, W = self._check_inputs(x, t, y, force_drop_ids)
        text = self._check_context(B, encoder_hidden_states, encoder_attention_mask)
        if block_residuals is not None and len(block_residuals) > len(self.blocks):
            raise ValueError(
                f"DiT: block_residuals has {len(block_residuals)} entries, the model "
                f"{len(self.blocks)} blocks"
            )
        grid_h, grid_w = H // self.patch_size, W // self.patch_size
        t = t.expand(B) * self.config.time_scale  # (B,)

        h = self.x_embedder(x) + self.position_embedding(grid_h, grid_w)  # (B, N, D)
        c = self.embed_condition(t, y, force_drop_ids)  # (B, D)
        mask = self.dtr_masks(t).to(h.dtype) if self.config.dtr else None  # (B, D) or None
        noise_routed = [b.mlp for b in self.blocks if isinstance(b.mlp, NoiseRoutedMoE)]
        if noise_routed:  # MoDE: the routers see the timestep embedding alone
            t_emb = self.t_embedder(t)  # (B, D)
            for layer in noise_routed:
                layer.noise_level = (t, t_emb)
        for i, block in enumerate(self.blocks):
            h = block(h, c, mask, **text) if text else block(h, c, mask)  # (B, N, D)
            if block_residuals is not None and i < len(block_residuals):
                h = h + block_residuals[i]
        for layer in noise_routed:
            layer.noise_level = None
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return self.unpatchify(h, grid_h, grid_w)  # (B, C_out, H, W)

    def _check_context(self, B, encoder_hidden_states, encoder_attention_mask) -> dict:
        """The blocks' text keyword arguments ({} without cross-attention), checked."""
        dim = self.config.cross_attention_dim
        if dim is None:
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError(
                    "DiT: encoder_hidden_states and encoder_attention_mask need a model with "
                    "cross-attention (DiTConfig.cross_attention_dim is None)"
                )
            return {}
        ehs = encoder_hidden_states
        if ehs is None:
            raise ValueError(
                "DiT: this model has cross-attention; encoder_hidden_states [B, L, "
                f"{dim}] is required (encode the empty prompt for the unconditional branch)"
            )
        if ehs.ndim != 3 or ehs.shape[0] != B or ehs.shape[2] != dim or ehs.shape[1] < 1:
            raise ValueError(
                f"DiT: encoder_hidden_states must be [{B}, L, {dim}] with L >= 1, "
                f"got {list(ehs.shape)}"
            )
        keep = encoder_attention_mask
        if keep is not None:
            if keep.shape != ehs.shape[:2]:
                raise ValueError(
                    f"DiT: encoder_attention_mask must be [{B}, {ehs.shape[1]}], "
                    f"got {list(keep.shape)}"
                )
            keep = keep != 0  # (B, L) bool
        return {"encoder_hidden_states": ehs, "encoder_attention_mask": keep}

    def _check_inputs(self, x, t, y, force_drop_ids):
        p, C = self.patch_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"DiT: x must be [B, {C}, H, W] with H and W multiples of {p}, got {list(x.shape)}"
            )
        B, _, H, W = x.shape
        if not (t.ndim == 0 or t.shape == (B,)):
            raise ValueError(f"DiT: t must have shape [{B}] or [], got {list(t.shape)}")
        if self.y_embedder is None:
            if y is not None or force_drop_ids is not None:
                raise ValueError(
                    "DiT: y and force_drop_ids must be None for an unconditional model"
                )
        else:
            if y is not None and (y.shape != (B,) or y.is_floating_point()):
                raise ValueError(
                    f"DiT: y must be integer labels of shape [{B}], got {y.dtype} {list(y.shape)}"
                )
            if force_drop_ids is not None and force_drop_ids.shape != (B,):
                raise ValueError(
                    f"DiT: force_drop_ids must have shape [{B}], got {list(force_drop_ids.shape)}"
                )
        return B, H, W


#################################################################################
#                     Sine/cosine positional embedding                          #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M, embed_dim) = [sin(pos w), cos(pos w)], w_i = 10000^(-i / (embed_dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    out = pos.double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h*grid_w, embed_dim) float32, tokens in row-major order. As in DiT/MAE, the first
    half of the channels encodes the column and the second half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat(
        [
            get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten()),
            get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten()),
        ],
        dim=1,
    )
    return emb.float()


#################################################################################
#                                   DiT configs                                 #
#################################################################################

_PAPER_SIZES = {  # Table 1 of the DiT paper
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(patch_size=patch, **dims)
    for size, dims in _PAPER_SIZES.items()
    for patch in (2, 4, 8)
}
# For tests: 12k parameters, 8x8x4 inputs, 10 classes.
DIT_CONFIGS["DiT-tiny/2"] = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
    num_classes=10, frequency_embedding_size=32,
)  # fmt: skip
# For the CPU demo: 16x16 single-channel digits, 10 classes, no learned variance; 1.3M
# parameters, 16 tokens of 4x4 pixels, so a 2-core CPU trains it in a few minutes.
DIT_CONFIGS["DiT-demo/4"] = DiTConfig(
    input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_heads=4,
    num_classes=10, learn_sigma=False,
)  # fmt: skip

# DiT-MoE's released configs (arXiv 2407.11633): "8E2A" = 8 experts, 2 active per token; every
# block sparse, SwiGLU experts of width 4D, one shared expert of width 2D, balance loss 0.01.
for _size, _experts in (("S", 8), ("S", 16), ("B", 8), ("XL", 8)):
    DIT_CONFIGS[f"DiT-{_size}/2-{_experts}E2A"] = DiTConfig(
        patch_size=2, num_experts=_experts, moe_top_k=2, **_PAPER_SIZES[_size]
    )
DIT_CONFIGS["DiT-MoE-tiny/2"] = dataclasses.replace(
    DIT_CONFIGS["DiT-tiny/2"], num_experts=4, moe_top_k=2
)
# The demo's DiT with 8 experts, top-2, in every block (digits; `adaptdiff train --model ...`).
DIT_CONFIGS["DiT-MoE-demo/4"] = dataclasses.replace(
    DIT_CONFIGS["DiT-demo/4"], num_experts=8, moe_top_k=2
)


def create_dit(name: str, **overrides) -> DiT:
    """A freshly initialised DiT from a named config, e.g. ``create_dit("DiT-B/2",
    num_classes=0, time_scale=1000)``."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"create_dit: unknown name {name!r}; choose from {list(DIT_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_dit: unknown DiTConfig fields {unknown}")
    return DiT(dataclasses.replace(DIT_CONFIGS[name], **overrides))
