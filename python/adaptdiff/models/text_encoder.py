"""A small text encoder for prompts, and a DiT conditioned on its tokens by cross-attention.

- :class:`WordTokenizer`: lower-cased words (punctuation dropped) to ids over a fixed
  vocabulary (by default the digit captions' words, :data:`adaptdiff.data.captions.VOCABULARY`),
  after a ``<bos>`` token that every prompt has; padded to ``max_length`` with an attention mask
  (1: keep). The empty prompt ``""`` is ``<bos>`` alone: the unconditional prompt. A word
  outside the vocabulary raises (no silent ``<unk>``).
- :class:`TextEncoder`: token and learned position embeddings, a few pre-norm
  ``nn.TransformerEncoder`` layers over the kept tokens, a final LayerNorm;
  ``[B, L] ids -> [B, L, width]``. It is meant to be trained jointly with the DiT (nothing is
  pretrained; a frozen random encoder also works, worse).
- :class:`TextDiT`: a DiT with ``cross_attention_dim = encoder width`` and a text encoder,
  called as ``model(x, t, input_ids=..., attention_mask=...)`` so that
  :func:`adaptdiff.samplers.sample` batches a prompt (``cond``) and the empty or a negative
  prompt (``uncond``) like any other model keyword arguments; :meth:`TextDiT.prompt_kwargs`
  builds those dicts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.captions import VOCABULARY
from .dit import DiT, DiTConfig

SPECIAL = ("<pad>", "<bos>")


class WordTokenizer:
    """Words to ids: ``<pad>`` = 0, ``<bos>`` = 1, then ``words`` in order."""

    def __init__(self, words: Sequence[str] = VOCABULARY, max_length: int = 8):
        words = list(words)
        if len(set(words)) != len(words) or any(w in SPECIAL or not w for w in words):
            raise ValueError("WordTokenizer: words must be distinct, non-empty, not special")
        if max_length < 2:
            raise ValueError(f"WordTokenizer: max_length must be >= 2, got {max_length}")
        self.words = tuple(words)
        self.max_length = max_length
        self.ids = {w: i + len(SPECIAL) for i, w in enumerate(words)}
        self.vocab_size = len(SPECIAL) + len(words)
        self.pad_id, self.bos_id = 0, 1

    def split(self, text: str) -> list[str]:
        return re.findall(r"[a-z0-9<>]+", text.lower())

    def __call__(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, max_length] int64, attention_mask [B, max_length] bool)``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for b, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError(f"WordTokenizer: prompts must be strings, got {text!r}")
            words = self.split(text)
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(
                    f"WordTokenizer: prompt {text!r} has words outside the vocabulary: {unknown}"
                )
            if len(words) + 1 > self.max_length:
                raise ValueError(
                    f"WordTokenizer: prompt {text!r} has {len(words)} words; at most "
                    f"{self.max_length - 1} fit in max_length={self.max_length}"
                )
            row = [self.bos_id] + [self.ids[w] for w in words]
            ids[b, : len(row)] = torch.tensor(row)
        return ids, ids != self.pad_id


@dataclass
class TextEncoderConfig:
    vocab_size: int = len(SPECIAL) + len(VOCABULARY)
    max_length: int = 8
    width: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "width", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextEncoderConfig: {name} must be positive")
        if self.width % self.num_heads:
            raise ValueError("TextEncoderConfig: num_heads must divide width")


class TextEncoder(nn.Module):
    """``forward(input_ids [B, L], attention_mask [B, L] | None) -> [B, L, width]``."""

    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.width, config.num_heads, int(config.width * config.mlp_ratio),
            dropout=0.0, activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.layers = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_length:
            raise ValueError(
                f"TextEncoder: input_ids must be [B, L <= {cfg.max_length}], "
                f"got {list(input_ids.shape)}"
            )
        L = input_ids.shape[1]
        h = self.token_embedding(input_ids) + self.position_embedding[:L]
        pad = None if attention_mask is None else attention_mask == 0  # True: ignore
        return self.norm(self.layers(h, src_key_padding_mask=pad))


class TextDiT(nn.Module):
    """A cross-attention DiT with its text encoder, trained together (see the module
    docstring). ``dit_config.cross_attention_dim`` is set to the encoder's width."""

    def __init__(
        self,
        dit_config: DiTConfig,
        text_config: TextEncoderConfig | None = None,
        tokenizer: WordTokenizer | None = None,
    ):
        super().__init__()
        text_config = text_config or TextEncoderConfig()
        self.tokenizer = tokenizer or WordTokenizer(max_length=text_config.max_length)
        if self.tokenizer.vocab_size > text_config.vocab_size:
            raise ValueError(
                f"TextDiT: the tokenizer has {self.tokenizer.vocab_size} ids, the encoder "
                f"{text_config.vocab_size}"
            )
        if self.tokenizer.max_length > text_config.max_length:
            raise ValueError("TextDiT: tokenizer.max_length exceeds the encoder's max_length")
        if dit_config.cross_attention_dim not in (None, text_config.width):
            raise ValueError(
                f"TextDiT: dit_config.cross_attention_dim ({dit_config.cross_attention_dim}) "
                f"must be None or the encoder width ({text_config.width})"
            )
        cfg = dataclasses.replace(dit_config, cross_attention_dim=text_config.width)
        self.dit = DiT(cfg)
        self.text_encoder = TextEncoder(text_config)

    @property
    def config(self) -> DiTConfig:
        return self.dit.config

    # The DiT's structure, for accelerators that hook blocks on the model ``sample`` calls
    # (SADA's token-wise recomputation, ``accel.apply``); views, not registered submodules.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.dit.blocks

    @property
    def patch_size(self) -> int:
        return self.dit.patch_size

    @property
    def in_channels(self) -> int:
        return self.dit.in_channels

    def tokenize(self, prompts: Sequence[str] | str, device=None) -> dict:
        """``{"input_ids", "attention_mask"}`` of ``prompts`` (the keyword arguments of
        :meth:`forward`), on ``device`` (default: the model's)."""
        ids, keep = self.tokenizer(prompts)
        device = device or self.dit.pos_embed.device
        return {"input_ids": ids.to(device), "attention_mask": keep.to(device)}

    def prompt_kwargs(
        self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None
    ) -> tuple[dict, dict]:
        """``(cond, uncond)`` for ``sample``: the prompts, and the negative prompts (default
        the empty, unconditional prompt; one string is used for every sample)."""
        if negative_prompts is None or isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts or ""] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(
                f"TextDiT.prompt_kwargs: {len(prompts)} prompts but "
                f"{len(negative_prompts)} negative_prompts"
            )
        return self.tokenize(list(prompts)), self.tokenize(list(negative_prompts))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """The DiT's text keyword arguments for token ids."""
        return {
            "encoder_hidden_states": self.text_encoder(input_ids, attention_mask),
            "encoder_attention_mask": attention_mask,
        }

    def forward(self, x, t, y=None, force_drop_ids=None, *, input_ids, attention_mask):
        return self.dit(x, t, y, force_drop_ids, **self.encode(input_ids, attention_mask))
