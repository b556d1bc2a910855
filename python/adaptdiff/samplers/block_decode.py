"""Block decoding for block-diffusion LMs with an exact KV cache, and an AR baseline decoder.

:func:`block_decode` generates ``max_new_tokens`` after a prompt, one block of ``block_size``
tokens at a time (``docs/block-diffusion.md``, block decoding). Committed blocks never change,
so their K/V are exact and cached (:class:`~adaptdiff.models.KVCache`); a *peek* forward runs the
current block against the cache without committing, a *commit* forward writes the finished block.

- Unshifted models (SDAR / BD3-LM, ``shifted=False``): blocks are counted from position 0 of the
  prompt; the ``⌊P/B⌋·B`` full prompt blocks are prefilled block-causally and the prompt tail
  opens the first block. Each block costs its peeks plus one commit; ``fuse=True`` (default)
  runs the commit of block k in the same forward as the first peek of block k+1 (and the prefill
  with the first peek), so a block costs only its peeks.
- Shifted models (NBDiff, ``shifted=True``): the prompt is prefilled causally and its last logit
  gives the first generated token; blocks start there. The output at i scores token i+1, so each
  block's first token is known and its peeks fill the other ``B-1``; the commit runs causally
  inside the block (as the clean stream was trained) and its last logit is the AR first token of
  the next block. There is nothing to fuse.

Rules (``rule``) choose which still-masked positions of the active (sub-)block to unmask after a
peek, scored by the confidence p̂ of the sampled token; ``k_s`` is the static schedule,
``⌊n/S⌋`` (+1 for the first ``n mod S`` steps) for the ``n`` masks of a (sub-)block and
``S = steps``:

- ``"static"``: the top-``k_s`` by confidence.
- ``"threshold"``: every p̂ ≥ τ, and at least the top-1 (Fast-dLLM, NBDiff).
- ``"threshold_k"``: every p̂ > τ, and at least the top-``k_s`` (SDAR ``low_confidence_dynamic``).
- ``"entropy"``: the largest prefix of masks sorted by entropy whose summed entropy is ≤ γ
  (``entropy_bound``), at least one (EB-sampler; entropy of the full distribution).
- ``"margin"``: as ``"threshold"`` with the score top1 − top2 probability (NBDiff).
- ``"sequential"``: the leftmost ``k_s`` masks.

``sub_block_size`` decodes a block's sub-blocks left to right (NBDiff / openPangu). Sampling:
``temperature=0`` is greedy, else temperature, top-k, top-p then a multinomial draw. Rows stop at
the first ``eos_id`` (block-granular: a row is dropped from the batch when a finished block holds
it); rows advance through a block at their own pace (a row whose block is done skips the peeks)
and the commit is shared. ``record=True`` keeps, per row, a trajectory of
:class:`TraceStep` (the row's forward index, position, token, log-prob, entropy), the data that
trajectory-aware RL (TraceRL) consumes. ``use_cache=False`` recomputes the whole prefix at every
forward instead: the reference the tests compare the cache with.

``prefix`` (both decoders): a :class:`~adaptdiff.models.KVCache` holding the committed K/V of
tokens every row sees before the prompt (one cache row per prompt row; an image's tokens, see
:mod:`adaptdiff.models.vl`). The decoder copies it into its own cache and never changes it; the
prompt's positions start at ``prefix.length`` and blocks are counted from the prompt's first
token, so a prefix whose length is a multiple of ``block_size`` keeps the block grid the model
was trained with. Forward counts leave out the prefix's prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..models.block_lm import BlockDiffusionLM, KVCache

RULES = ("static", "threshold", "threshold_k", "entropy", "margin", "sequential")


class TraceStep(NamedTuple):
    step: int  # the row's forward index (prefill = 0) at which the token was unmasked
    position: int
    token: int
    logprob: float
    entropy: float


@dataclass
class DecodeOutput:
    """``sequences[r]``: prompt + generated tokens of row r, cut after its first EOS or at
    ``max_new_tokens``. ``forwards``: model calls; ``row_forwards[r]``: calls row r took part in;
    ``num_generated[r]``: tokens returned after the prompt."""

    sequences: list[Tensor]
    num_generated: Tensor
    forwards: int
    row_forwards: Tensor
    trajectory: list[list[TraceStep]] | None = None

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward a row took part in (TPF), over all rows."""
        return float(self.num_generated.sum()) / max(1, int(self.row_forwards.sum()))


# ----------------------------------------------------------------------------------------------
# Sampling and selection (pure functions)
# ----------------------------------------------------------------------------------------------


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw a token at every position of ``logits [..., V]``. Returns the tokens, their
    probability p̂ (the confidence), the entropy of the distribution sampled from, and the
    top1 − top2 probability margin."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
        if top_k > 0 and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the top one always
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat.cpu(), 1, generator=generator).view(probs.shape[:-1])
        tokens = tokens.to(probs.device)
    else:
        tokens = probs.argmax(-1)
    conf = probs.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    return tokens, conf, entropy, margin


def select_tokens(
    rule: str,
    masked: Tensor,
    conf: Tensor,
    entropy: Tensor,
    margin: Tensor,
    k: Tensor,
    *,
    threshold: float = 0.9,
    entropy_bound: float = 1.0,
) -> Tensor:
    """Which positions to unmask: a bool ``[R, n]`` within ``masked [R, n]``; ``k [R]`` is the
    static schedule count. Every row with a mask unmasks at least one."""
    if rule not in RULES:
        raise ValueError(f"select_tokens: rule must be one of {RULES}, got {rule!r}")
    n_masked = masked.sum(1)
    pos = torch.arange(masked.shape[1], device=masked.device).expand_as(masked)
    score = {
        "entropy": -entropy,
        "margin": margin,
        "sequential": -pos.float(),
    }.get(rule, conf)
    score = score.masked_fill(~masked, -math.inf)
    order = score.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, pos)
    if rule in ("static", "sequential"):
        count = k
    elif rule == "threshold":
        count = (masked & (conf >= threshold)).sum(1).clamp(min=1)
    elif rule == "threshold_k":
        count = torch.maximum((masked & (conf > threshold)).sum(1), k)
    elif rule == "margin":
        count = (masked & (margin >= threshold)).sum(1).clamp(min=1)
    else:  # entropy: the lowest-entropy prefix with summed entropy <= bound
        sorted_entropy = entropy.masked_fill(~masked, 0).gather(1, order)
        fits = (sorted_entropy.cumsum(1) <= entropy_bound) & (pos < n_masked[:, None])
        count = fits.sum(1).clamp(min=1)
    count = torch.minimum(count.clamp(min=1), n_masked)
    return masked & (rank < count[:, None])


def schedule_count(n: Tensor, step: Tensor, steps: int) -> Tensor:
    """k_s for ``n`` masks and 0-based ``step`` of ``steps``: ⌊n/S⌋, +1 for the first n mod S."""
    return n // steps + (step < n % steps).long()


# ----------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------


class _Decoder:
    """State shared by the two decoders: the token buffer, active rows, cache and counters."""

    def __init__(
        self, model, prompt, max_new_tokens, end, eos_id, use_cache, record, sampling, prefix
    ):
        b, self.p = prompt.shape
        self.prefix, self.end = prefix, end
        self.model, self.eos_id, self.use_cache, self.sampling = model, eos_id, use_cache, sampling
        self.mask_id = model.mask_token_id
        self.limit = self.p + max_new_tokens
        self.tokens = torch.full((b, end), self.mask_id, dtype=torch.long, device=prompt.device)
        self.tokens[:, : self.p] = prompt
        self.active = torch.arange(b, device=prompt.device)
        self.cache = self.new_cache(None) if use_cache else None
        self.committed = 0
        self.forwards = 0
        self.row_forwards = torch.zeros(b, dtype=torch.long)
        self.trajectory = [[] for _ in range(b)] if record else None

    def new_cache(self, rows: Tensor | None) -> KVCache:
        """An empty cache for ``rows`` (original row indices; None: all), or a copy of the
        prefix's rows with room for ``end`` more tokens."""
        b = self.tokens.shape[0] if rows is None else len(rows)
        if self.prefix is None:
            return KVCache(self.model, b, self.end)
        n = self.prefix.length
        cache = KVCache(self.model, b, n + self.end)
        for layer, (k, v) in enumerate(zip(self.prefix.k, self.prefix.v, strict=True)):
            pick = slice(None) if rows is None else rows
            cache.k[layer][:, :, :n] = k[pick, :, :n]
            cache.v[layer][:, :, :n] = v[pick, :, :n]
        cache.commit(n)
        return cache

    def forward(self, start, end, rows, block_size, commit, last, causal_prefix=False) -> Tensor:
        """Runs positions ``start..end-1`` of ``rows`` (indices into the active rows; None: all)
        and returns the logits of the ``last`` positions (the LM head never sees a long prefill);
        ``start`` must be the committed length; commits ``commit`` tokens."""
        assert start == self.committed
        ids_rows = self.active if rows is None else self.active[rows]
        m = self.model
        if self.use_cache:
            h = m(
                self.tokens[ids_rows, start:end],
                layout="block_causal",
                block_size=block_size,
                cache=self.cache,
                rows=rows,
                return_hidden=True,
            )
            self.cache.commit(commit)
        elif not causal_prefix:  # unshifted: one block-causal forward (after a prefix's cache)
            h = m(
                self.tokens[ids_rows, :end],
                layout="block_causal",
                block_size=block_size,
                cache=None if self.prefix is None else self.new_cache(ids_rows),
                return_hidden=True,
            )[:, start:]
        else:  # shifted: a fresh causal prefill of the prefix, then the new tokens
            cache = self.new_cache(ids_rows)
            if start:
                m(self.tokens[ids_rows, :start], layout="causal", cache=cache)
                cache.commit(start)
            h = m(
                self.tokens[ids_rows, start:end],
                layout="block_causal",
                block_size=block_size,
                cache=cache,
                return_hidden=True,
            )
        self.committed += commit
        self.forwards += 1
        self.row_forwards[ids_rows.cpu()] += 1
        logits = m.logits(h[:, h.shape[1] - last :]).float()
        logits[..., self.mask_id] = -math.inf  # never generate the mask token
        return logits

    def place(self, logits: Tensor, pos: int) -> None:
        """Sample the token at ``pos`` of every active row from ``logits [R, V]`` (AR step)."""
        tokens, conf, entropy, _ = sample_tokens(logits, **self.sampling)
        self.tokens[self.active, pos] = tokens
        chosen = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        where = torch.tensor([pos])
        self.record(self.active, where, chosen, tokens[:, None], conf[:, None], entropy[:, None])

    def drop_finished(self) -> None:
        if self.eos_id is None or not len(self.active):
            return
        done = (self.tokens[self.active, self.p : self.limit] == self.eos_id).any(1)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            self.active = self.active[keep]
            if self.cache is not None:
                self.cache.keep(keep)

    def record(self, ids_rows, positions, chosen, tokens, conf, entropy) -> None:
        if self.trajectory is None:
            return
        for r, p in chosen.nonzero().tolist():
            row = int(ids_rows[r])
            self.trajectory[row].append(
                TraceStep(
                    int(self.row_forwards[row]) - 1,
                    int(positions[p]),
                    int(tokens[r, p]),
                    float(conf[r, p].clamp_min(1e-30).log()),
                    float(entropy[r, p]),
                )
            )

    def output(self) -> DecodeOutput:
        seqs, counts = [], []
        for row in self.tokens[:, : self.limit]:
            end = self.limit
            if self.eos_id is not None:
                hits = (row[self.p :] == self.eos_id).nonzero()
                if len(hits):
                    end = self.p + int(hits[0]) + 1
            seqs.append(row[:end].clone())
            counts.append(end - self.p)
        return DecodeOutput(
            seqs, torch.tensor(counts), self.forwards, self.row_forwards, self.trajectory
        )


def _check_common(model, prompt, max_new_tokens, temperature, top_k, top_p, prefix=None) -> None:
    if not isinstance(model, BlockDiffusionLM):
        raise ValueError(f"model must be a BlockDiffusionLM, got {type(model).__name__}")
    if prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.dtype != torch.long:
        raise ValueError(
            f"prompt must be int64 [batch, length >= 1], got {prompt.dtype} {tuple(prompt.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prefix is not None:
        cfg = model.config
        want = (prompt.shape[0], cfg.n_kv_heads, cfg.head_dim)
        if not isinstance(prefix, KVCache) or len(prefix.k) != cfg.n_layers:
            raise ValueError(f"prefix must be a KVCache of the model, got {type(prefix).__name__}")
        got = prefix.k[0].shape
        if (got[0], got[1], got[3]) != want:
            raise ValueError(
                f"prefix must hold [batch={want[0]}, n_kv_heads={want[1]}, head_dim={want[2]}] "
                f"K/V per layer (one row per prompt row), got {tuple(got)}"
            )
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0, top_p in (0, 1]; got {temperature}, {top_k}, "
            f"{top_p}"
        )


@torch.no_grad()
def block_decode(
    model: BlockDiffusionLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    block_size: int = 4,
    steps: int | None = None,
    rule: str = "threshold",
    threshold: float = 0.9,
    entropy_bound: float = 1.0,
    sub_block_size: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    shifted: bool = False,
    fuse: bool | None = None,
    use_cache: bool = True,
    record: bool = False,
    generator: torch.Generator | None = None,
    prefix: KVCache | None = None,
) -> DecodeOutput:
    """Block-diffusion decoding of ``prompt [batch, P]`` (see the module docstring); the rows of
    a batch share the prompt length (block boundaries and cache length are common to all rows).
    ``steps`` (default: the sub-block size) sets the static schedule k_s."""
    _check_common(model, prompt, max_new_tokens, temperature, top_k, top_p, prefix)
    if rule not in RULES:
        raise ValueError(f"block_decode: rule must be one of {RULES}, got {rule!r}")
    sub = sub_block_size or block_size
    if block_size < 1 or sub < 1 or block_size % sub:
        raise ValueError(
            f"block_decode: block_size ({block_size}) must be >= 1 and a multiple of "
            f"sub_block_size ({sub_block_size})"
        )
    steps = steps or sub
    if steps < 1:
        raise ValueError(f"block_decode: steps must be >= 1, got {steps}")
    if fuse and shifted:
        raise ValueError(
            "block_decode: fuse applies to unshifted models (a shifted model's "
            "commit pass emits the next block's first token instead)"
        )
    fuse = (not shifted) if fuse is None else fuse
    p = prompt.shape[1]
    if shifted:
        first, end = p, p + -(-max_new_tokens // block_size) * block_size
    else:
        first, end = (
            p // block_size * block_size,
            -(-(p + max_new_tokens) // block_size) * block_size,
        )
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    d = _Decoder(model, prompt, max_new_tokens, end, eos_id, use_cache, record, sampling, prefix)
    b = prompt.shape[0]
    sub_index = torch.full((b,), -1, dtype=torch.long)  # per original row: active sub-block
    sub_n0 = torch.zeros(b, dtype=torch.long)  # masks in it when it became active
    sub_step = torch.zeros(b, dtype=torch.long)

    def unmask(logits: Tensor, rows: Tensor | None, start: int, offset: int) -> None:
        """Apply one selection to block positions ``offset..`` of ``rows`` from ``logits``."""
        ids_rows = d.active if rows is None else d.active[rows]
        cpu_rows = ids_rows.cpu()
        span = slice(start + offset, start + block_size)
        masked = d.tokens[ids_rows, span] == d.mask_id
        tokens, conf, entropy, margin = sample_tokens(logits, **sampling)
        # the active sub-block: the first one of the block that still has masks
        block_pos = torch.arange(offset, block_size, device=masked.device)
        sub_of = block_pos // sub
        first_sub = torch.where(masked, sub_of, block_size).min(1).values.cpu()
        fresh = first_sub != sub_index[cpu_rows]
        in_sub = sub_of[None, :] == first_sub.to(masked.device)[:, None]
        live = masked & in_sub
        sub_index[cpu_rows] = first_sub
        sub_n0[cpu_rows] = torch.where(fresh, live.sum(1).cpu(), sub_n0[cpu_rows])
        sub_step[cpu_rows] = torch.where(fresh, 0, sub_step[cpu_rows])
        k = schedule_count(sub_n0[cpu_rows], sub_step[cpu_rows], steps).to(masked.device)
        sub_step[cpu_rows] += 1
        chosen = select_tokens(
            rule, live, conf, entropy, margin, k, threshold=threshold, entropy_bound=entropy_bound
        )
        d.tokens[ids_rows, span] = torch.where(chosen, tokens, d.tokens[ids_rows, span])
        d.record(ids_rows, block_pos + start, chosen, tokens, conf, entropy)

    def masked_rows(start: int, offset: int) -> Tensor:
        span = d.tokens[d.active, start + offset : start + block_size]
        return (span == d.mask_id).any(1).nonzero().squeeze(1)

    if shifted:  # causal prefill; its last logit is the first generated token
        d.place(d.forward(0, p, None, 1, p, 1, causal_prefix=True)[:, -1], p)
        d.drop_finished()
    start = first
    while start < end and len(d.active):
        sub_index[:] = -1
        if shifted:
            while len(rows := masked_rows(start, 1)):
                logits = d.forward(start, start + block_size, rows, block_size, 0, block_size, True)
                unmask(logits[:, :-1], rows, start, 1)
            d.drop_finished()
            if start + block_size < end and len(d.active):  # causal commit -> next block's first
                logits = d.forward(start, start + block_size, None, 1, block_size, 1, True)[:, -1]
                d.place(logits, start + block_size)
                d.drop_finished()
        else:
            if not fuse and d.committed < start:  # prefill / commit of the previous block
                d.forward(d.committed, start, None, block_size, start - d.committed, 1)
            rows = None  # the first peek runs every row (and carries a fused commit)
            while rows is None or len(rows):
                commit = start - d.committed
                last = block_size
                logits = d.forward(d.committed, start + last, rows, block_size, commit, last)
                unmask(logits, rows, start, 0)
                rows = masked_rows(start, 0)
            d.drop_finished()
        start += block_size
    return d.output()


@torch.no_grad()
def ar_decode(
    model: BlockDiffusionLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    prefix: KVCache | None = None,
) -> DecodeOutput:
    """Autoregressive decoding with a KV cache (``use_cache=False``: recompute the whole prefix
    every token): one forward per token, the prefill's last logit giving the first."""
    _check_common(model, prompt, max_new_tokens, temperature, top_k, top_p, prefix)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    p = prompt.shape[1]
    d = _Decoder(
        model,
        prompt,
        max_new_tokens,
        p + max_new_tokens,
        eos_id,
        use_cache,
        False,
        sampling,
        prefix,
    )
    logits = d.forward(0, p, None, 1, p, 1, causal_prefix=True)[:, -1]
    for pos in range(p, p + max_new_tokens):
        d.place(logits, pos)
        d.drop_finished()
        if pos + 1 == p + max_new_tokens or not len(d.active):
            break
        logits = d.forward(pos, pos + 1, None, 1, 1, 1, causal_prefix=True)[:, -1]
    return d.output()
