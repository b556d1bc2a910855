"""BlockDiffusionLM: a decoder-only transformer that runs as an AR model and as a block-diffusion
LM (SDAR / BD3-LM / NBDiff), in one file.

Llama-style blocks: RMSNorm, rotary position embeddings (RoPE) applied at *explicit* position ids,
grouped-query attention (GQA), SwiGLU; the vocabulary includes a ``[MASK]`` token
(``config.mask_token_id``). Every attention call goes through the op
:func:`adaptdiff.ops.block_attention`, in one of these modes:

- ``layout="causal"``: an AR model (the op's ``block_causal`` layout with block size 1).
- ``layout="block_causal"``: block-causal prefill (token i sees keys of blocks <= its block).
- ``layout="bd3"``: SDAR/BD3-LM training on ``ids = [x_t | x_0]`` (length 2n): noisy blocks see
  themselves and the clean blocks before them, the clean half is block-causal.
- ``layout="context_causal"``: NBDiff training, as ``bd3`` but with a plain causal clean half.

For the two training layouts both halves get positions ``0..n-1`` by default, so RoPE sees the
same geometry as at inference.

Decoding uses an exact :class:`KVCache`. ``model(ids, cache=cache, block_size=bs)`` runs the
new tokens at positions ``cache.length + 0..n-1``: each sees the whole cache plus the new tokens
of its own and earlier ``bs``-blocks (``bs >= n``: all new tokens, ``bs = 1``: causal). Their K/V
are written into the cache's uncommitted tail but ``cache.length`` does not move: the caller
*commits* the first ``c`` new tokens by ``cache.commit(c)`` and a *peek* simply commits nothing
(the tail is overwritten by the next call, as JetEngine does). So one forward can commit block k
and peek block k+1 (the fusion of :mod:`adaptdiff.samplers.block_decode`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import block_attention

LAYOUTS = ("causal", "block_causal", "bd3", "context_causal")


@dataclass
class BlockLMConfig:
    """Sizes of a BlockDiffusionLM. ``vocab_size`` counts the mask token; ``mask_token_id``
    defaults to the last id (as :class:`adaptdiff.data.CharTokenizer` lays it out)."""

    vocab_size: int = 104
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 384  # SwiGLU width
    max_seq_len: int = 1024  # RoPE table size (positions beyond it are computed on the fly)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    mask_token_id: int | None = None
    # Knobs of converted Hugging Face LMs (:func:`adaptdiff.models.block_lm_from_hf`); the
    # defaults are the plain Llama-style block above.
    head_dim: int = 0  # 0: dim // n_heads (Qwen3 sets it independently)
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...} as transformers
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    out_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)

    def __post_init__(self) -> None:
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockLMConfig: {name} must be > 0, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
                raise ValueError(
                    f"BlockLMConfig: dim ({self.dim}) must split into n_heads ({self.n_heads}) "
                    "heads of even size (RoPE rotates pairs)"
                )
            self.head_dim = self.dim // self.n_heads
        elif self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(
                f"BlockLMConfig: head_dim must be even and > 0 (RoPE rotates pairs), got "
                f"{self.head_dim}"
            )
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates the scaling
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"BlockLMConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads})"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"BlockLMConfig: mask_token_id must be in [0, {self.vocab_size}), "
                f"got {self.mask_token_id}"
            )


BLOCK_LM_CONFIGS: dict[str, dict] = {
    # ~0.09M parameters: unit tests.
    "BlockLM-tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128),
    # ~0.81M parameters: the CPU demo (docs/block-diffusion.md, the LM demo): 4 layers, d=128,
    # 4 heads.
    "BlockLM-demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384),
    # ~24M parameters: a small word-piece model.
    "BlockLM-S": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1408),
}


def create_block_lm(name: str, vocab_size: int, **overrides) -> BlockDiffusionLM:
    """A :class:`BlockDiffusionLM` from a named config of :data:`BLOCK_LM_CONFIGS`."""
    if name not in BLOCK_LM_CONFIGS:
        raise ValueError(f"create_block_lm: unknown name {name!r}; one of {list(BLOCK_LM_CONFIGS)}")
    return BlockDiffusionLM(
        BlockLMConfig(vocab_size=vocab_size, **{**BLOCK_LM_CONFIGS[name], **overrides})
    )


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer K/V ``[batch, n_kv_heads, capacity, head_dim]`` (post-RoPE) and the committed
    ``length``; positions are cache indices. Rows share the length (decoding is block-synchronous
    across rows); :meth:`keep` drops finished rows."""

    def __init__(self, model: BlockDiffusionLM, batch: int, capacity: int) -> None:
        cfg = model.config
        p = model.tok_embeddings.weight
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.v = [p.new_zeros(shape) for _ in range(cfg.n_layers)]
        self.capacity = capacity
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def commit(self, n: int) -> None:
        """Make the first ``n`` tokens of the last forward part of the cache."""
        if not 0 <= n or self.length + n > self.capacity:
            raise ValueError(f"KVCache.commit: cannot commit {n} tokens at length {self.length}")
        self.length += n

    def keep(self, rows: Tensor) -> None:
        """Keep only these batch rows (an index tensor), in this order."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]

    def write(self, layer: int, k: Tensor, v: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Store new K/V at the tail; return the keys/values the new tokens attend to."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} tokens exceed the capacity {self.capacity}")
        if rows is None:
            self.k[layer][:, :, self.length : end] = k
            self.v[layer][:, :, self.length : end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        self.k[layer][rows, :, self.length : end] = k
        self.v[layer][rows, :, self.length : end] = v
        return self.k[layer][rows, :, :end], self.v[layer][rows, :, :end]


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * (
            self.weight
        )


ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """The ``[head_dim/2]`` RoPE frequencies, optionally rescaled as transformers does for
    ``rope_type`` ``"linear"`` (all divided by ``factor``) and ``"llama3"`` (low frequencies
    divided by ``factor``, a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"BlockLMConfig: rope_scaling type {kind!r} is not supported; one of {ROPE_SCALINGS}"
        )
    try:
        if kind == "linear":
            return inv_freq / scaling["factor"]
        if kind == "llama3":
            names = ("factor", "low_freq_factor", "high_freq_factor")
            factor, low, high = (scaling[k] for k in names)
            old_len = scaling["original_max_position_embeddings"]
    except KeyError as e:
        raise ValueError(f"BlockLMConfig: rope_scaling {kind!r} needs the field {e}") from None
    if kind == "default":
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_angles(
    positions: Tensor, head_dim: int, theta: float, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin ``[..., L, head_dim/2]`` for integer ``positions [..., L]``."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of ``x [B, H, L, Dh]``; cos/sin
    ``[B, L, Dh/2]`` (or broadcastable)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attend_new_tokens(q: Tensor, k: Tensor, v: Tensor, past: int, block_size: int) -> Tensor:
    """Attention of ``n`` new queries at positions ``past..past+n-1`` over keys ``0..past+n-1``:
    new token i sees every past key and the new keys of blocks ``<= i // block_size`` (blocks
    counted from the first new token). Only :func:`block_attention` calls: one ``block_causal``
    call without a past, one ``decode`` call when all new tokens see each other, else one
    ``decode`` call per new block."""
    n = q.shape[2]
    if past == 0:
        return block_attention(q, k, v, block_size, "block_causal")
    if block_size >= n:
        return block_attention(q, k, v, n, "decode")
    outs = []
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        keys = slice(0, past + end)
        outs.append(
            block_attention(q[:, :, start:end], k[:, :, keys], v[:, :, keys], end - start, "decode")
        )
    return torch.cat(outs, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: BlockLMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        layout: str,
        block_size: int,
        cache: KVCache | None = None,
        layer: int = 0,
        rows: Tensor | None = None,
    ) -> Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            past = cache.length
            k, v = cache.write(layer, k, v, rows)
            o = attend_new_tokens(q, k, v, past, block_size)
        elif layout in ("bd3", "context_causal"):
            o = block_attention(q, k, v, block_size, layout)
        else:
            o = block_attention(q, k, v, 1 if layout == "causal" else block_size, "block_causal")
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: BlockLMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: BlockLMConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope, layout, block_size, cache=None, layer=0, rows=None):
        x = x + self.attention(self.attention_norm(x), rope, layout, block_size, cache, layer, rows)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class BlockDiffusionLM(nn.Module):
    """``model(ids [B, L], layout=..., block_size=..., positions=None, cache=None) -> logits``
    (``return_hidden=True``: the final-norm hidden states ``[B, L, dim]`` instead, for a chunked
    loss over :attr:`output_weight`). See the module docstring for the layouts and the cache."""

    def __init__(self, config: BlockLMConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style: scale the residual projections
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables (non-persistent buffers): after building on the ``meta``
        device and loading weights with ``assign=True``."""
        cfg = self.config
        positions = torch.arange(cfg.max_seq_len, device=device)
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def output_weight(self) -> Tensor:
        """The ``[vocab, dim]`` matrix of the LM head."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.output_weight)

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        if int(positions.max()) < self.config.max_seq_len and positions.min() >= 0:
            return self.rope_cos[positions], self.rope_sin[positions]
        cfg = self.config
        return rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        ids: Tensor,
        *,
        layout: str = "causal",
        block_size: int = 1,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        rows: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"BlockDiffusionLM: ids must be [batch, length], got {ids.shape}")
        if layout not in LAYOUTS:
            raise ValueError(f"BlockDiffusionLM: layout must be one of {LAYOUTS}, got {layout!r}")
        if block_size < 1:
            raise ValueError(f"BlockDiffusionLM: block_size must be >= 1, got {block_size}")
        n = ids.shape[1]
        if positions is None:
            if cache is not None:
                positions = torch.arange(cache.length, cache.length + n, device=ids.device)
            elif layout in ("bd3", "context_causal"):
                if n % 2:
                    raise ValueError(
                        f"BlockDiffusionLM: layout {layout!r} takes [x_t | x_0], an even length; "
                        f"got {n}"
                    )
                positions = torch.arange(n // 2, device=ids.device).repeat(2)
            else:
                positions = torch.arange(n, device=ids.device)
        if cache is not None and layout != "block_causal" and layout != "causal":
            raise ValueError("BlockDiffusionLM: a cache takes layout 'causal' or 'block_causal'")
        if cache is not None and layout == "causal":
            block_size = 1
        rope = self._rope(positions)
        x = self.tok_embeddings(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, layout, block_size, cache, i, rows)
        x = self.norm(x)
        return x if return_hidden else self.logits(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(
            f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config)
        )
