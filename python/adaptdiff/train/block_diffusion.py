"""Training recipes for :class:`~adaptdiff.models.BlockDiffusionLM`: AR pre-training and the two
AR -> block-diffusion conversions (``docs/block-diffusion.md``, training recipes).

- :func:`ar_loss`: next-token cross-entropy, causal layout.
- :func:`sdar_loss` (SDAR / BD3-LM): ``bd3`` layout on ``[x_t | x_0]``, *unshifted* targets (the
  noisy output at i predicts token i), ``1/t``-weighted masked cross-entropy, t per sample or per
  block, optional antithetic (stratified) t, prompt tokens never masked.
- :func:`nbdiff_loss` (NBDiff): ``context_causal`` layout, *shifted* targets (the output at i
  predicts token i+1, as the AR head did; the first token of a block is never masked because at
  inference it comes from the AR commit pass), plus the auxiliary AR loss on the causal clean
  stream; :func:`curriculum_block_size` grows the block 1 -> 2 -> 4 -> 8.

The masked diffusion ELBO is ``E_t (1/t) Σ_masked -log p(x0_i | x_t)``; ``normalize`` picks the
denominator (``docs/block-diffusion.md``): ``"tokens"`` (SDAR: the loss-bearing tokens of the
batch), ``"answer"`` (LLaDA SFT / DiffusionVL: per sample by its answer length, then the batch
mean), ``"sequence"`` (LLaDA pre-training: batch x sequence length) or ``"masked"`` (the mean
over masked tokens: a plain denoising loss, not a bound). Cross-entropy is computed by
:func:`chunked_cross_entropy`, which never holds full-vocabulary logits for more than
``chunk_size`` tokens at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NORMALIZE = ("tokens", "answer", "sequence", "masked")
T_PER = ("sample", "block")
EPS = 1e-3  # t ~ U(eps, 1), as in the SDAR, BD3-LM and LLaDA code


def _ce_chunk(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096
) -> Tensor:
    """Per-token cross-entropy of ``hidden [N, D] @ weight[V, D]^T`` against ``targets [N]``,
    ``chunk_size`` tokens at a time; with gradients each chunk's logits are recomputed in the
    backward pass (activation checkpointing), so at most one chunk of ``[chunk, V]`` logits is
    alive at once."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_cross_entropy: hidden must be [N, D] and targets [N], got "
            f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    out = []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad and hidden.shape[0] > chunk_size:
            out.append(checkpoint(_ce_chunk, h, weight, t, use_reentrant=False))
        else:
            out.append(_ce_chunk(h, weight, t))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _split(batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """A batch is ``ids`` or ``(ids, prompt_mask)``."""
    if isinstance(batch, Tensor):
        return batch, None
    ids, *rest = batch
    return ids, (rest[0].bool() if rest else None)


def ar_loss(model: nn.Module, batch, *, chunk_size: int = 4096) -> Tensor:
    """Mean next-token cross-entropy (causal layout); prompt tokens are not targets."""
    ids, prompt = _split(batch)
    hidden = model(ids[:, :-1], layout="causal", return_hidden=True)
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if prompt is None else ~prompt[:, 1:]
    ce = chunked_cross_entropy(
        hidden[keep], _unwrap(model).output_weight, ids[:, 1:][keep], chunk_size
    )
    return ce.sum() / keep.sum().clamp(min=1)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def sample_mask_times(
    batch: int,
    n_blocks: int,
    *,
    per: str = "sample",
    antithetic: bool = False,
    eps: float = EPS,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mask rates ``t [batch, n_blocks]`` in ``[eps, 1]``: one per sample (repeated over its
    blocks) or one per block; ``antithetic`` stratifies the draws over ``[0, 1)`` (BD3-LM)."""
    if per not in T_PER:
        raise ValueError(f"sample_mask_times: per must be one of {T_PER}, got {per!r}")
    count = batch if per == "sample" else batch * n_blocks
    u = torch.rand(count, generator=generator)
    if antithetic:
        u = (u / count + torch.arange(count) / count) % 1
        u = u[torch.randperm(count, generator=generator)]
    t = (1 - eps) * u + eps
    t = t.view(batch, 1).expand(batch, n_blocks) if per == "sample" else t.view(batch, n_blocks)
    return t.contiguous().to(device)


def corrupt(
    ids: Tensor, t: Tensor, mask_id: int, maskable: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Replace each ``maskable`` token with ``mask_id`` with probability ``t`` (per token, same
    shape as ``ids``). A row with maskable tokens but none masked gets one (SDAR re-draws; forcing
    one random maskable token is the same in distribution up to the re-draw count)."""
    u = torch.rand(ids.shape, generator=generator).to(ids.device)
    masked = (u < t) & maskable
    empty = ~masked.any(1) & maskable.any(1)
    if empty.any():
        noise = torch.rand(ids.shape, generator=generator).to(ids.device)
        pick = torch.where(maskable, noise, -1.0).argmax(1)
        masked[empty, pick[empty]] = True
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def _normalize(weighted: Tensor, eligible: Tensor, masked: Tensor, normalize: str) -> Tensor:
    """``weighted [B, L]`` (zero where not masked) to a scalar by the chosen denominator."""
    if normalize == "tokens":
        return weighted.sum() / eligible.sum().clamp(min=1)
    if normalize == "answer":
        return (weighted.sum(1) / eligible.sum(1).clamp(min=1)).mean()
    if normalize == "sequence":
        return weighted.sum() / weighted.numel()
    return weighted.sum() / masked.sum().clamp(min=1)


def _check(ids: Tensor, block_size: int, normalize: str, name: str) -> None:
    if block_size < 1 or ids.shape[1] % block_size:
        raise ValueError(
            f"{name}: block_size must be >= 1 and divide the length {ids.shape[1]}, "
            f"got {block_size}"
        )
    if normalize not in NORMALIZE:
        raise ValueError(f"{name}: normalize must be one of {NORMALIZE}, got {normalize!r}")


def sdar_loss(
    model: nn.Module,
    batch,
    *,
    block_size: int,
    t_per: str = "sample",
    antithetic: bool = False,
    normalize: str = "tokens",
    eps: float = EPS,
    chunk_size: int = 4096,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SDAR / BD3-LM conversion loss on ``batch = ids [B, L]`` or ``(ids, prompt_mask)``."""
    ids, prompt = _split(batch)
    _check(ids, block_size, normalize, "sdar_loss")
    b, n = ids.shape
    eligible = torch.ones_like(ids, dtype=torch.bool) if prompt is None else ~prompt
    t = sample_mask_times(
        b, n // block_size, per=t_per, antithetic=antithetic, eps=eps, generator=generator
    )
    t = t.to(ids.device).repeat_interleave(block_size, dim=1)
    noisy, masked = corrupt(ids, t, _unwrap(model).mask_token_id, eligible, generator)
    hidden = model(
        torch.cat([noisy, ids], 1), layout="bd3", block_size=block_size, return_hidden=True
    )
    ce = chunked_cross_entropy(
        hidden[:, :n][masked], _unwrap(model).output_weight, ids[masked], chunk_size
    )
    weighted = torch.zeros_like(t).masked_scatter(masked, ce / t[masked])
    return _normalize(weighted, eligible, masked, normalize)


def nbdiff_loss(
    model: nn.Module,
    batch,
    *,
    block_size: int,
    ar_weight: float = 1.0,
    t_per: str = "sample",
    antithetic: bool = False,
    normalize: str = "tokens",
    eps: float = EPS,
    chunk_size: int = 4096,
    generator: torch.Generator | None = None,
) -> Tensor:
    """NBDiff conversion loss: shifted masked diffusion loss in the ``context_causal`` layout plus
    ``ar_weight`` x the AR loss of the clean (causal) half. With ``block_size=1`` no token is
    maskable (each block's only token comes from the AR pass) and this is the AR loss."""
    ids, prompt = _split(batch)
    _check(ids, block_size, normalize, "nbdiff_loss")
    b, n = ids.shape
    eligible = torch.ones_like(ids, dtype=torch.bool) if prompt is None else ~prompt
    pos = torch.arange(n, device=ids.device)
    maskable = eligible & (pos % block_size != 0)  # block starts come from the AR commit
    t = sample_mask_times(
        b, n // block_size, per=t_per, antithetic=antithetic, eps=eps, generator=generator
    )
    t = t.to(ids.device).repeat_interleave(block_size, dim=1)
    noisy, masked = corrupt(ids, t, _unwrap(model).mask_token_id, maskable, generator)
    hidden = model(
        torch.cat([noisy, ids], 1),
        layout="context_causal",
        block_size=block_size,
        return_hidden=True,
    )
    weight = _unwrap(model).output_weight
    # Shifted: the noisy output at i-1 (same block, as i is no block start) predicts token i.
    src = torch.zeros_like(masked)
    src[:, :-1] = masked[:, 1:]
    ce = chunked_cross_entropy(hidden[:, :n][src], weight, ids[masked], chunk_size)
    weighted = torch.zeros_like(t).masked_scatter(masked, ce / t[masked])
    mdm = _normalize(weighted, maskable, masked, normalize) if maskable.any() else hidden.sum() * 0
    # AR loss on the clean stream: output n+i predicts token i+1.
    keep = eligible[:, 1:]
    ar = chunked_cross_entropy(hidden[:, n:-1][keep], weight, ids[:, 1:][keep], chunk_size)
    return mdm + ar_weight * ar.sum() / keep.sum().clamp(min=1)


def curriculum_block_size(step: int, total_steps: int, sizes: Sequence[int] = (1, 2, 4, 8)) -> int:
    """NBDiff's growing block: ``sizes`` in equal shares of ``total_steps`` (step is 0-based)."""
    if not sizes:
        raise ValueError("curriculum_block_size: sizes must not be empty")
    stage = min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))
    return int(sizes[stage])


class BlockLMLoss:
    """``loss_fn(model, batch)`` for :class:`~adaptdiff.train.Trainer`: ``recipe`` in
    ``"ar"``, ``"sdar"``, ``"nbdiff"``; ``curriculum`` (block sizes) makes the block size a
    function of the trainer's step: set :attr:`trainer` after building the Trainer."""

    RECIPES = ("ar", "sdar", "nbdiff")

    def __init__(
        self,
        recipe: str,
        *,
        block_size: int = 4,
        curriculum: Sequence[int] | None = None,
        total_steps: int | None = None,
        **kwargs,
    ) -> None:
        if recipe not in self.RECIPES:
            raise ValueError(f"BlockLMLoss: recipe must be one of {self.RECIPES}, got {recipe!r}")
        if curriculum is not None and total_steps is None:
            raise ValueError("BlockLMLoss: a curriculum needs total_steps")
        self.recipe, self.block_size, self.kwargs = recipe, block_size, kwargs
        self.curriculum, self.total_steps = curriculum, total_steps
        self.trainer = None

    def current_block_size(self) -> int:
        if self.curriculum is None:
            return self.block_size
        step = self.trainer.step if self.trainer is not None else 0
        return curriculum_block_size(step, self.total_steps, self.curriculum)

    def __call__(self, model: nn.Module, batch) -> Tensor:
        if self.recipe == "ar":
            return ar_loss(model, batch, **self.kwargs)
        fn = sdar_loss if self.recipe == "sdar" else nbdiff_loss
        return fn(model, batch, block_size=self.current_block_size(), **self.kwargs)


def text_dataset(tokens: Tensor, length: int, stride: int | None = None) -> Tensor:
    """All windows ``[N, length]`` of a 1-D token tensor at ``stride`` (default ``length // 2``),
    a dataset for the Trainer."""
    stride = stride or max(1, length // 2)
    if tokens.dim() != 1 or tokens.numel() < length:
        raise ValueError(f"text_dataset: need 1-D tokens of at least {length}, got {tokens.shape}")
    return tokens.unfold(0, length, stride).contiguous()
