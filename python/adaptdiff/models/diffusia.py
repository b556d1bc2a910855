"""DiffuSIA-lite: encoder-decoder text diffusion in embedding space with the *spiral*
interaction, and an encoder-decoder AR baseline of the same size, in one file.

The diffusion model (Diffusion-LM / DiffuSeq style, x0-prediction):

- Target words have learnable embeddings ``E [vocab, emb_dim]``; a target ``w [B, L]`` is
  ``x0 = E[w]`` and is noised as ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with
  Diffusion-LM's *sqrt* schedule ``abar_t = 1 - sqrt(t + s)``, ``t`` in [0, 1]
  (:func:`sqrt_alpha_bar`).
- The encoder reads the source ids; the decoder reads ``x_t`` (projected to ``dim``, plus
  positions and the time embedding), cross-attends to the encoder and predicts ``x0_hat``.
- Rounding uses the tied head ``logits_w = -|x0_hat - E_w|^2`` (:meth:`DiffuSIA.logits`),
  so the most likely word is the nearest embedding.
- Loss (:func:`diffusion_lm_loss`): ``MSE(x0_hat, x0) + CE(logits(x0_hat), w)``.
- Sampling (:func:`diffusia_generate`): DDIM (eta = 0) from ``t = 1`` to ``t = 0`` in a few
  steps; with ``clamp`` every ``x0_hat`` is replaced by the embedding of its rounded word
  before the step (Diffusion-LM's clamping trick); the last ``x0_hat`` is rounded to words.

The encoder-decoder wiring (``config.interaction``):

- ``"final"``: the plain encoder-decoder: the encoder runs alone, every decoder layer
  cross-attends to its last layer; the encoder never sees the target, so sampling encodes the
  source once.
- ``"spiral"``: DiffuSIA. With ``E_0`` the source embeddings and ``D_0`` the decoder input,
  layer ``l = 1..n_layers`` is

      E_l = FFN(CrossAttn(SelfAttn(E_{l-1}), D_{l-1}))    (the encoder reads the noisy target)
      D_l = FFN(CrossAttn(SelfAttn(D_{l-1}), E_l))        (decoder layer l reads encoder layer l)

  so the two streams spiral up together. The encoder depends on ``x_t``, so it runs again at
  every sampling step (no caching of the source encoding).

Choices the paper's abstract leaves open, made here: the layer pairing above (a same-layer
two-pass variant is possible); the encoder's cross-attention to ``D_{l-1}`` (the decoder state
*before* layer ``l``, so one pass suffices); pre-norm residual blocks, with a LayerNorm on
the attended memory in every cross-attention; the rounding CE on the prediction ``x0_hat``
(Diffusion-LM also rounds the clean embedding); no self-conditioning and no adaptive
per-position schedule (SeqDiffuSeq's additions).

:class:`Seq2SeqAR` is the AR baseline: the same encoder (no interaction), a causal decoder
that cross-attends to the encoder's last layer, greedy decoding (:meth:`Seq2SeqAR.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import TimestepEmbedder

INTERACTIONS = ("spiral", "final")


@dataclass
class DiffuSIAConfig:
    """Sizes of a :class:`DiffuSIA` (and of its :class:`Seq2SeqAR` twin): ``n_layers``
    encoder layers and as many decoder layers of width ``dim``; ``emb_dim`` is the size of the
    word embeddings the diffusion runs in; ``max_len`` bounds source and target lengths."""

    vocab_size: int = 259
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 128  # MLP width
    emb_dim: int = 16
    max_len: int = 64
    interaction: str = "spiral"
    schedule_s: float = 1e-4  # the sqrt schedule's offset

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "emb_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiffuSIAConfig: {name} must be > 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"DiffuSIAConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.interaction not in INTERACTIONS:
            raise ValueError(
                f"DiffuSIAConfig: interaction must be one of {INTERACTIONS}, "
                f"got {self.interaction!r}"
            )
        if not 0 < self.schedule_s < 1:
            raise ValueError(f"DiffuSIAConfig: schedule_s must be in (0, 1), got {self.schedule_s}")


DIFFUSIA_CONFIGS: dict[str, dict] = {
    # unit tests
    "DiffuSIA-tiny": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, emb_dim=8),
    # the study (adaptdiff study diffusia)
    "DiffuSIA-small": dict(dim=64, n_layers=3, n_heads=4, hidden_dim=128, emb_dim=16),
}


def create_diffusia(name: str, vocab_size: int, **overrides) -> DiffuSIA:
    """A :class:`DiffuSIA` from a named config of :data:`DIFFUSIA_CONFIGS`."""
    if name not in DIFFUSIA_CONFIGS:
        raise ValueError(f"create_diffusia: unknown name {name!r}; one of {list(DIFFUSIA_CONFIGS)}")
    return DiffuSIA(
        DiffuSIAConfig(vocab_size=vocab_size, **{**DIFFUSIA_CONFIGS[name], **overrides})
    )


def create_seq2seq_ar(name: str, vocab_size: int, bos_id: int = 2, **overrides) -> Seq2SeqAR:
    """A :class:`Seq2SeqAR` with the sizes of the named DiffuSIA config."""
    if name not in DIFFUSIA_CONFIGS:
        raise ValueError(
            f"create_seq2seq_ar: unknown name {name!r}; one of {list(DIFFUSIA_CONFIGS)}"
        )
    cfg = DiffuSIAConfig(vocab_size=vocab_size, **{**DIFFUSIA_CONFIGS[name], **overrides})
    return Seq2SeqAR(cfg, bos_id=bos_id)


def sqrt_alpha_bar(t: Tensor, s: float = 1e-4) -> Tensor:
    """Diffusion-LM's sqrt schedule: ``abar_t = 1 - sqrt(t + s)`` for ``t`` in [0, 1]
    (clamped to [0, 1]; ``abar_1`` is exactly 0 for s = 0 and ~0 otherwise)."""
    return (1 - torch.sqrt(t + s)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class _MultiHeadAttention(nn.Module):
    """Attention of ``x [B, N, D]`` over ``memory [B, M, D]`` (``memory=None``: itself)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor | None = None, causal: bool = False) -> Tensor:
        B, N, D = x.shape
        memory = x if memory is None else memory
        h = self.n_heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(memory).view(B, memory.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """A pre-norm block: self-attention, then (``cross``) cross-attention to a memory
    (LayerNorm-ed here), then the MLP; each with a residual."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, cross: bool, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _MultiHeadAttention(dim, n_heads)
        self.cross = _MultiHeadAttention(dim, n_heads) if cross else None
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.norm_mem = nn.LayerNorm(dim) if cross else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=self.causal)
        if self.cross is not None:
            if memory is None:
                raise ValueError("Block: a cross-attention block needs memory")
            x = x + self.cross(self.norm2(x), self.norm_mem(memory))
        return x + self.mlp(self.norm3(x))


def _positions(max_len: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(max_len, dim) * 0.02)


def _check_ids(fn: str, name: str, ids: Tensor, cfg: DiffuSIAConfig) -> None:
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"{fn}: {name} must be int64 [B, L], got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_len:
        raise ValueError(f"{fn}: {name} has length {ids.shape[1]} > max_len {cfg.max_len}")


# ----------------------------------------------------------------------------------------------
# The diffusion model
# ----------------------------------------------------------------------------------------------


class DiffuSIA(nn.Module):
    """Encoder-decoder text diffusion in embedding space; ``config.interaction`` picks the
    spiral (DiffuSIA) or the plain (``"final"``) wiring (module docstring)."""

    def __init__(self, config: DiffuSIAConfig):
        super().__init__()
        self.config = cfg = config
        spiral = cfg.interaction == "spiral"
        # The diffusion space: N(0, 1) init as Diffusion-LM, so words start about as far apart
        # as the noise at t = 1 is large.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.in_proj = nn.Linear(cfg.emb_dim, cfg.dim)
        # The source reads the same word embeddings (as DiffuSeq), through its own projection.
        self.src_proj = nn.Linear(cfg.emb_dim, cfg.dim)
        self.src_pos = _positions(cfg.max_len, cfg.dim)
        self.tgt_pos = _positions(cfg.max_len, cfg.dim)
        self.time = TimestepEmbedder(cfg.dim, frequency_embedding_size=cfg.dim)
        self.encoder = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.hidden_dim, cross=spiral) for _ in range(cfg.n_layers)
        )
        self.decoder = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.hidden_dim, cross=True) for _ in range(cfg.n_layers)
        )
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.emb_dim)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """The schedule's ``abar_t`` (:func:`sqrt_alpha_bar` with the config's offset)."""
        return sqrt_alpha_bar(t, self.config.schedule_s)

    def encode(self, src: Tensor) -> Tensor:
        """The plain wiring's source encoding ``[B, S, dim]`` (the last encoder layer), which
        :meth:`forward` accepts as ``memory`` so a sampler encodes once. The spiral encoder
        depends on the noisy target, so it has no such encoding: a ValueError."""
        if self.config.interaction == "spiral":
            raise ValueError("DiffuSIA.encode: the spiral encoder reads x_t; call forward")
        _check_ids("DiffuSIA.encode", "src", src, self.config)
        e = self._source(src)
        for layer in self.encoder:
            e = layer(e)
        return e

    def _source(self, src: Tensor) -> Tensor:
        return self.src_proj(self.embed(src)) + self.src_pos[: src.shape[1]]

    def forward(self, src: Tensor, x_t: Tensor, t: Tensor, memory: Tensor | None = None) -> Tensor:
        """``x0_hat [B, L, emb_dim]`` from the source ids ``src [B, S]``, the noisy target
        embeddings ``x_t [B, L, emb_dim]`` and the times ``t [B]`` in [0, 1]. ``memory``: the
        plain wiring's :meth:`encode` of ``src`` (computed here when None)."""
        cfg = self.config
        _check_ids("DiffuSIA.forward", "src", src, cfg)
        if x_t.dim() != 3 or x_t.shape[0] != src.shape[0] or x_t.shape[2] != cfg.emb_dim:
            raise ValueError(
                f"DiffuSIA.forward: x_t must be [{src.shape[0]}, L, {cfg.emb_dim}], "
                f"got {tuple(x_t.shape)}"
            )
        if x_t.shape[1] > cfg.max_len:
            raise ValueError(f"DiffuSIA.forward: x_t length {x_t.shape[1]} > max_len {cfg.max_len}")
        if t.shape != (src.shape[0],):
            raise ValueError(f"DiffuSIA.forward: t must be [{src.shape[0]}], got {tuple(t.shape)}")
        d = self.in_proj(x_t) + self.tgt_pos[: x_t.shape[1]] + self.time(t * 1000)[:, None]
        if cfg.interaction == "spiral":
            e = self._source(src)
            for enc, dec in zip(self.encoder, self.decoder, strict=True):
                e = enc(e, d)  # E_l reads D_{l-1}
                d = dec(d, e)  # D_l reads E_l
        else:
            e = self.encode(src) if memory is None else memory
            for dec in self.decoder:
                d = dec(d, e)
        return self.out_proj(self.out_norm(d))

    def logits(self, x: Tensor) -> Tensor:
        """The tied rounding head ``[..., vocab]`` of ``x [..., emb_dim]``: minus the squared
        distance to every word's embedding, ``2 x E^T - |E_w|^2 - |x|^2``. (A plain ``x E^T``
        head need not round ``E[w]`` back to ``w``: a longer embedding can win.)"""
        w = self.embed.weight
        return 2 * x @ w.T - w.pow(2).sum(1) - x.pow(2).sum(-1, keepdim=True)

    def round(self, x: Tensor) -> Tensor:
        """Words of embeddings ``x``: the nearest embedding (the argmax of :meth:`logits`)."""
        return self.logits(x).argmax(-1)


def diffusion_lm_loss(
    x0_hat: Tensor, x0: Tensor, logits: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """``(mse, ce)``: the mean squared error of the prediction ``x0_hat`` to the clean
    embeddings ``x0`` (both ``[B, L, emb_dim]``; mean over every element) and the rounding
    cross-entropy of ``logits [B, L, vocab]`` (of ``x0_hat``) to the words ``target [B, L]``
    (mean over positions). Diffusion-LM trains on their sum."""
    if x0_hat.shape != x0.shape:
        raise ValueError(
            f"diffusion_lm_loss: x0_hat and x0 must have one shape, got {tuple(x0_hat.shape)} "
            f"and {tuple(x0.shape)}"
        )
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"diffusion_lm_loss: logits [B, L, V] must match target [B, L], got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    mse = (x0_hat - x0).pow(2).mean()
    ce = F.cross_entropy(logits.flatten(0, -2), target.flatten())
    return mse, ce


def diffusia_loss(
    model: DiffuSIA, src: Tensor, tgt: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, float]]:
    """One training loss: ``t ~ U[0, 1]`` per row, ``x_t`` from ``x0 = E[tgt]``,
    :func:`diffusion_lm_loss` of the prediction; returns ``(mse + ce, {"mse", "ce"})``."""
    _check_ids("diffusia_loss", "tgt", tgt, model.config)
    B = tgt.shape[0]
    dev = tgt.device
    t = torch.rand(B, generator=generator, device=generator.device if generator else dev).to(dev)
    x0 = model.embed(tgt)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else dev)
    abar = model.alpha_bar(t).view(B, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps.to(dev)
    x0_hat = model(src, x_t, t)
    mse, ce = diffusion_lm_loss(x0_hat, x0, model.logits(x0_hat), tgt)
    return mse + ce, {"mse": float(mse.detach()), "ce": float(ce.detach())}


@torch.no_grad()
def diffusia_generate(
    model: DiffuSIA,
    src: Tensor,
    *,
    length: int | None = None,
    steps: int = 10,
    clamp: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Target words ``[B, length]`` (default: the source length) for ``src [B, S]``: DDIM
    (eta = 0) over ``steps`` uniform times from 1 to 0, each step one forward; ``clamp``
    replaces each ``x0_hat`` by the embedding of its rounded word. The plain wiring encodes the
    source once; the spiral one cannot (its encoder reads ``x_t``)."""
    if steps < 1:
        raise ValueError(f"diffusia_generate: steps must be >= 1, got {steps}")
    cfg = model.config
    _check_ids("diffusia_generate", "src", src, cfg)
    B, L = src.shape[0], length or src.shape[1]
    dev = src.device
    gen_dev = generator.device if generator is not None else dev
    x = torch.randn((B, L, cfg.emb_dim), generator=generator, device=gen_dev).to(dev)
    memory = model.encode(src) if cfg.interaction == "final" else None
    times = torch.linspace(1.0, 0.0, steps + 1, device=dev)
    for i in range(steps):
        t, s = times[i], times[i + 1]
        x0_hat = model(src, x, t.expand(B), memory=memory)
        words = model.round(x0_hat)
        x0 = model.embed(words) if clamp else x0_hat
        a_t, a_s = model.alpha_bar(t), model.alpha_bar(s)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt().clamp_min(1e-8)
        x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    return words


# ----------------------------------------------------------------------------------------------
# The AR baseline
# ----------------------------------------------------------------------------------------------


class Seq2SeqAR(nn.Module):
    """An encoder-decoder AR model with the sizes of a :class:`DiffuSIAConfig`: the encoder
    of the plain wiring, a causal decoder cross-attending to its last layer, untied LM head.
    Targets are read after ``bos_id`` (``forward(src, [bos, y_1 .. y_{L-1}])`` predicts
    ``y_1 .. y_L``)."""

    def __init__(self, config: DiffuSIAConfig, bos_id: int = 2):
        super().__init__()
        self.config = cfg = config
        if not 0 <= bos_id < cfg.vocab_size:
            raise ValueError(f"Seq2SeqAR: bos_id must be in [0, {cfg.vocab_size}), got {bos_id}")
        self.bos_id = bos_id
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.src_pos = _positions(cfg.max_len, cfg.dim)
        self.tgt_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tgt_pos = _positions(cfg.max_len, cfg.dim)
        self.encoder = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.hidden_dim, cross=False) for _ in range(cfg.n_layers)
        )
        self.decoder = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.hidden_dim, cross=True, causal=True)
            for _ in range(cfg.n_layers)
        )
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)

    def encode(self, src: Tensor) -> Tensor:
        _check_ids("Seq2SeqAR.encode", "src", src, self.config)
        e = self.src_embed(src) + self.src_pos[: src.shape[1]]
        for layer in self.encoder:
            e = layer(e)
        return e

    def forward(self, src: Tensor, tgt_in: Tensor, memory: Tensor | None = None) -> Tensor:
        """Next-word logits ``[B, L, vocab]`` for the decoder input ``tgt_in [B, L]``."""
        _check_ids("Seq2SeqAR.forward", "tgt_in", tgt_in, self.config)
        e = self.encode(src) if memory is None else memory
        d = self.tgt_embed(tgt_in) + self.tgt_pos[: tgt_in.shape[1]]
        for layer in self.decoder:
            d = layer(d, e)
        return self.head(self.out_norm(d))

    def loss(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher-forced cross-entropy of ``tgt [B, L]``."""
        bos = torch.full_like(tgt[:, :1], self.bos_id)
        logits = self(src, torch.cat([bos, tgt[:, :-1]], 1))
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten())

    @torch.no_grad()
    def generate(self, src: Tensor, length: int | None = None) -> Tensor:
        """Greedy decoding of ``length`` words (default: the source length), the source encoded
        once; the decoder reruns over the prefix each step (no KV cache)."""
        L = length or src.shape[1]
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), self.bos_id, dtype=torch.int64, device=src.device)
        for _ in range(L):
            logits = self(src, out, memory=memory)[:, -1]
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
        return out[:, 1:]


def param_count(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DIFFUSIA_CONFIGS",
    "INTERACTIONS",
    "Block",
    "DiffuSIA",
    "DiffuSIAConfig",
    "Seq2SeqAR",
    "create_diffusia",
    "create_seq2seq_ar",
    "diffusia_generate",
    "diffusia_loss",
    "diffusion_lm_loss",
    "param_count",
    "sqrt_alpha_bar",
]
