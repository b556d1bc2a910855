"""TraceRL: trajectory-aware reinforcement learning for block-diffusion LMs
(``docs/block-diffusion.md``, TraceRL).

A rollout is a :func:`~adaptdiff.samplers.block_decode` run with ``record=True``: for every
generated token, the decoder's forward index (the *step*) at which it was committed. The policy
is trained on that trajectory, not on a random re-masking of the answer:

- :func:`step_map` / :func:`shrink_steps`: the step id of every position (prompt: -1);
  ``shrink=s`` merges every ``s`` consecutive distinct steps of a block into one.
- :func:`trace_rounds`: the states the decoder saw. In round r every block takes the positions
  of its r-th distinct step as targets and masks every position of the block whose step is at
  least that one: exactly the block the decoder peeked at when it committed them. One round is
  one row of the ``bd3`` layout ``[x_t | x_0]`` (each noisy block sees itself and the *clean*
  blocks before it, as the decoder saw committed blocks), so :func:`trace_logprobs` recomputes
  the committed tokens' log-probabilities under the current policy in the decoder's context.
- :func:`importance_ratio`, :func:`clipped_objective`, :func:`kl_k3`: the PPO pieces (ratio
  ``exp(clamp(logπ - logπ_old, ±10))``, ``min(ρA, clip(ρ, 1±ε)A)``, the k3 KL estimator
  ``exp(ref - logπ) - (ref - logπ) - 1`` towards the frozen reference model).
- Advantages: :func:`group_advantages` (GRPO: rewards z-scored within the rollouts of a prompt,
  one advantage for every token of a rollout) or, with the diffusion value model
  (:class:`ValueModel`: a value head over a copy of the backbone, run on the same trace rows),
  :func:`trace_gae`: the reward sits on the last step, the value of a step is the mean of its
  tokens' values, GAE runs over decoding steps and a token's advantage is
  ``r_s + γ V_{s+1} + γλ A_{s+1} - v_token`` (tokens committed at one step share that step's
  target).
- :func:`block_size_at`: the block-size enlargement schedule (rollouts at larger blocks as
  training goes on).

:class:`TraceRL` puts them together: one :meth:`TraceRL.step` draws ``group_size`` rollouts per
prompt, rewards them, builds the trace rows and takes ``ppo_epochs`` policy updates (and value
updates). Only unshifted models (SDAR / BD3-LM layout) and sampling by temperature alone are
handled.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.block_lm import BlockDiffusionLM
from ..samplers.block_decode import RULES, TraceStep, block_decode

ADVANTAGES = ("value", "group")
RATIO_CLAMP = 10.0

# ----------------------------------------------------------------------------------------------
# Trajectories to training rows
# ----------------------------------------------------------------------------------------------


def step_map(trajectory: Sequence[TraceStep], length: int) -> Tensor:
    """``[length]`` step ids: the step at which each position was committed, -1 where the
    trajectory committed nothing (the prompt, padding)."""
    steps = torch.full((length,), -1, dtype=torch.long)
    for t in trajectory:
        if not 0 <= t.position < length:
            raise ValueError(f"step_map: position {t.position} outside [0, {length})")
        steps[t.position] = t.step
    return steps


def shrink_steps(steps: Tensor, block_size: int, shrink: int) -> Tensor:
    """Merge every ``shrink`` consecutive distinct step ids within each block into the first
    of them (fewer rounds, coarser credit); -1 entries are kept."""
    if shrink < 1 or block_size < 1:
        raise ValueError(f"shrink_steps: need shrink, block_size >= 1, got {shrink}, {block_size}")
    out = steps.clone()
    for b in range(0, len(steps), block_size):
        block = steps[b : b + block_size]
        distinct = block[block >= 0].unique(sorted=True)
        for i, s in enumerate(distinct.tolist()):
            out[b : b + block_size][block == s] = int(distinct[i - i % shrink])
    return out


def trace_rounds(
    tokens: Tensor, steps: Tensor, block_size: int, mask_id: int
) -> tuple[Tensor, Tensor]:
    """The decoder's states for ``tokens [L]`` with step ids ``steps [L]`` (-1: never masked):
    ``noisy [K, L]`` and ``targets [K, L]`` (bool), K = the most distinct steps of a block. In
    round r each block masks its positions whose step is >= its r-th smallest step, and those
    at exactly that step are the round's targets (a block with fewer steps is clean)."""
    if tokens.shape != steps.shape or tokens.dim() != 1:
        raise ValueError(
            f"trace_rounds: tokens and steps must be 1-D of one length, got "
            f"{tuple(tokens.shape)} and {tuple(steps.shape)}"
        )
    if block_size < 1 or len(tokens) % block_size:
        raise ValueError(
            f"trace_rounds: block_size ({block_size}) must divide the length {len(tokens)}"
        )
    per_block = [
        steps[b : b + block_size][steps[b : b + block_size] >= 0].unique(sorted=True)
        for b in range(0, len(tokens), block_size)
    ]
    rounds = max((len(d) for d in per_block), default=0)
    noisy = tokens.repeat(rounds, 1)
    targets = torch.zeros(rounds, len(tokens), dtype=torch.bool)
    for i, distinct in enumerate(per_block):
        span = slice(i * block_size, (i + 1) * block_size)
        s = steps[span]
        for r, current in enumerate(distinct.tolist()):
            noisy[r, span] = torch.where(s >= current, mask_id, tokens[span])
            targets[r, span] = s == current
    return noisy, targets


@dataclass
class TraceBatch:
    """The trace rows of a set of rollouts: ``noisy``/``clean``/``targets`` ``[R, L]``;
    ``sample [R]``: the rollout of each row; ``step_index [R, L]``: the rank of a target's
    (shrunk) step among its rollout's steps (-1 elsewhere); ``num_steps [N]``: steps per
    rollout; ``response_len [N]``: generated tokens per rollout."""

    noisy: Tensor
    clean: Tensor
    targets: Tensor
    sample: Tensor
    step_index: Tensor
    num_steps: Tensor
    response_len: Tensor


def build_trace_batch(
    sequences: Sequence[Tensor],
    trajectories: Sequence[Sequence[TraceStep]],
    block_size: int,
    mask_id: int,
    *,
    shrink: int = 1,
) -> TraceBatch:
    """Trace rows of every rollout. The decoder fills whole blocks and the output is cut at
    ``max_new_tokens``: tokens it committed past the cut are put back from the trajectory (the
    later steps of their block saw them) but are no targets; the buffer beyond is ``mask_id``
    (as the decoder's was), up to a multiple of ``block_size``."""
    reach = max(max((t.position + 1 for t in traj), default=0) for traj in trajectories)
    length = -(-max(reach, max(len(s) for s in sequences)) // block_size) * block_size
    rows = []
    for n, (seq, traj) in enumerate(zip(sequences, trajectories, strict=True)):
        tokens = torch.full((length,), mask_id, dtype=torch.long)
        tokens[: len(seq)] = seq.cpu()
        for t in traj:
            if t.position >= len(seq):
                tokens[t.position] = t.token
        steps = shrink_steps(step_map(traj, length), block_size, shrink)
        noisy, targets = trace_rounds(tokens, steps, block_size, mask_id)
        targets[:, len(seq) :] = False
        kept = steps[: len(seq)]
        distinct = kept[kept >= 0].unique(sorted=True)
        rank = torch.searchsorted(distinct, steps.clamp(min=0))
        index = torch.where(targets, rank, -1)
        count = sum(t.position < len(seq) for t in traj)
        rows.append((noisy, tokens.expand_as(noisy), targets, index, n, len(distinct), count))
    return TraceBatch(
        torch.cat([r[0] for r in rows]),
        torch.cat([r[1] for r in rows]),
        torch.cat([r[2] for r in rows]),
        torch.cat([torch.full((len(r[0]),), r[4], dtype=torch.long) for r in rows]),
        torch.cat([r[3] for r in rows]),
        torch.tensor([r[5] for r in rows]),
        torch.tensor([r[6] for r in rows]),
    )


def _hidden(model: BlockDiffusionLM, noisy: Tensor, clean: Tensor, block_size: int) -> Tensor:
    ids = torch.cat([noisy, clean], 1)
    return model(ids, layout="bd3", block_size=block_size, return_hidden=True)[:, : noisy.shape[1]]


def trace_logprobs(
    model: BlockDiffusionLM,
    noisy: Tensor,
    clean: Tensor,
    targets: Tensor,
    block_size: int,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Log-probabilities ``[T]`` of the target tokens (in ``targets.nonzero()`` order) under
    ``model`` in the decoder's context: the ``bd3`` forward of ``[noisy | clean]``, the
    ``[MASK]`` logit removed and the logits divided by ``temperature`` as the decoder sampled."""
    if temperature <= 0:
        raise ValueError(f"trace_logprobs: temperature must be > 0, got {temperature}")
    h = _hidden(model, noisy, clean, block_size)[targets]
    logits = model.logits(h).float()
    logits[:, model.mask_token_id] = -math.inf
    logp = F.log_softmax(logits / temperature, -1)
    return logp.gather(1, clean[targets][:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The objective's pieces
# ----------------------------------------------------------------------------------------------


def importance_ratio(logp: Tensor, logp_old: Tensor, clamp: float = RATIO_CLAMP) -> Tensor:
    """``exp(clamp(logp - logp_old, -clamp, clamp))``."""
    return torch.exp((logp - logp_old).clamp(-clamp, clamp))


def clipped_objective(ratio: Tensor, advantage: Tensor, clip_eps: float = 0.2) -> Tensor:
    """PPO's per-token surrogate ``min(ρ A, clip(ρ, 1-ε, 1+ε) A)`` (to be maximised)."""
    if clip_eps < 0:
        raise ValueError(f"clipped_objective: clip_eps must be >= 0, got {clip_eps}")
    return torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π || π_ref) at tokens drawn from π:
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: each reward z-scored within its group of ``group_size`` consecutive rollouts (the
    same prompt); a group of equal rewards gets zero advantage."""
    if group_size < 1 or rewards.dim() != 1 or len(rewards) % group_size:
        raise ValueError(
            f"group_advantages: rewards [N] with N a multiple of group_size ({group_size}), "
            f"got {tuple(rewards.shape)}"
        )
    g = rewards.float().view(-1, group_size)
    std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(1, keepdim=True)) / (std + eps)).view(-1)


def step_gae(
    rewards: Tensor, values: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """GAE over the ``S`` steps of one trajectory: ``δ_s = r_s + γ V_{s+1} - V_s`` (V_S = 0),
    ``A_s = δ_s + γλ A_{s+1}``; returns ``(advantages, returns = A + V)``, both ``[S]``."""
    if rewards.shape != values.shape or rewards.dim() != 1:
        raise ValueError(
            f"step_gae: rewards and values must be [S], got {tuple(rewards.shape)} and "
            f"{tuple(values.shape)}"
        )
    adv = torch.zeros_like(values)
    next_v = next_a = 0.0
    for s in range(len(values) - 1, -1, -1):
        adv[s] = rewards[s] + gamma * next_v - values[s] + gamma * lam * next_a
        next_v, next_a = values[s], adv[s]
    return adv, adv + values


def trace_gae(
    step_index: Tensor,
    token_values: Tensor,
    reward: float,
    num_steps: int,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Token advantages and value targets of one trajectory. ``step_index [T]``: the step of
    each token (0..num_steps-1), ``token_values [T]``: the value model's estimate at each token
    (in the state before it was committed). The reward sits on the last step; a step's value is
    the mean of its tokens' values; GAE over steps (:func:`step_gae`); a token's advantage is
    ``r_s + γ V_{s+1} + γλ A_{s+1} - v_token`` and its value target ``advantage + v_token``."""
    if step_index.shape != token_values.shape:
        raise ValueError("trace_gae: step_index and token_values must have one shape")
    if len(step_index) and (step_index.min() < 0 or step_index.max() >= num_steps):
        raise ValueError(f"trace_gae: step_index must lie in [0, {num_steps})")
    v = token_values.detach().float()
    count = torch.zeros(num_steps).index_add_(0, step_index, torch.ones_like(v))
    step_v = torch.zeros(num_steps).index_add_(0, step_index, v) / count.clamp(min=1)
    rewards = torch.zeros(num_steps)
    rewards[-1] = reward
    step_adv, _ = step_gae(rewards, step_v, gamma, lam)
    next_v = torch.cat([step_v[1:], torch.zeros(1)])
    next_a = torch.cat([step_adv[1:], torch.zeros(1)])
    s = step_index
    adv = rewards[s] + gamma * next_v[s] + gamma * lam * next_a[s] - v
    return adv, adv + v


def block_size_at(step: int, schedule: Sequence[tuple[int, int]]) -> int:
    """The block size at RL ``step`` from ``schedule = ((from_step, block_size), ...)`` sorted
    by ``from_step``, the first from step 0 (TraceRL's block-size enlargement)."""
    if not schedule or schedule[0][0] != 0:
        raise ValueError(f"block_size_at: schedule must start at step 0, got {schedule}")
    if any(b[0] <= a[0] for a, b in zip(schedule, schedule[1:], strict=False)):
        raise ValueError(f"block_size_at: schedule steps must increase, got {schedule}")
    size = schedule[0][1]
    for start, b in schedule:
        if step >= start:
            size = b
    return int(size)


# ----------------------------------------------------------------------------------------------
# The value model and the trainer
# ----------------------------------------------------------------------------------------------


class ValueModel(nn.Module):
    """The diffusion value model: a copy of the policy's backbone with a scalar head; on a trace
    row it gives, per position, the value of the state the decoder saw there."""

    def __init__(self, backbone: BlockDiffusionLM) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = nn.Linear(backbone.config.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, noisy: Tensor, clean: Tensor, block_size: int) -> Tensor:
        return self.head(_hidden(self.backbone, noisy, clean, block_size).float()).squeeze(-1)


@dataclass
class TraceRLConfig:
    """Knobs of :class:`TraceRL` (defaults: the paper's where they apply at this scale)."""

    group_size: int = 8  # rollouts per prompt
    block_size: int = 4
    block_schedule: tuple[tuple[int, int], ...] = ()  # (from_step, block_size); () = fixed
    rule: str = "threshold"
    threshold: float = 0.9
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.01  # 0: no reference model
    advantage: str = "value"  # "value" (diffusion value model + GAE) or "group" (GRPO)
    gamma: float = 1.0
    lam: float = 1.0
    shrink: int = 1
    ppo_epochs: int = 1
    lr: float = 1e-4
    value_lr: float = 1e-4
    max_grad_norm: float = 1.0
    row_chunk: int = 256  # trace rows per forward

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(
                f"TraceRLConfig: advantage must be one of {ADVANTAGES}, got {self.advantage!r}"
            )
        if self.rule not in RULES:
            raise ValueError(f"TraceRLConfig: rule must be one of {RULES}, got {self.rule!r}")
        if self.temperature <= 0:
            raise ValueError(
                f"TraceRLConfig: temperature must be > 0 (rollouts are sampled), got "
                f"{self.temperature}"
            )
        for name in ("group_size", "block_size", "shrink", "ppo_epochs", "row_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"TraceRLConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.block_schedule:
            block_size_at(0, self.block_schedule)


RewardFn = Callable[[Tensor, Tensor], Tensor]  # (generated [N, G], answers [N, A]) -> [N]


class TraceRL:
    """TraceRL on a :class:`BlockDiffusionLM` ``policy`` (trained in place). ``reward_fn``
    scores the generated tokens against the answers. The value model (``advantage="value"``)
    starts as a copy of the policy; the reference model (``kl_coef > 0``) is a frozen copy of the
    policy as it is now."""

    def __init__(
        self,
        policy: BlockDiffusionLM,
        reward_fn: RewardFn,
        config: TraceRLConfig | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(policy, BlockDiffusionLM):
            raise ValueError(f"TraceRL: policy must be a BlockDiffusionLM, got {type(policy)}")
        self.policy, self.reward_fn = policy, reward_fn
        self.cfg = cfg = config or TraceRLConfig()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.value = ValueModel(policy) if cfg.advantage == "value" else None
        self.opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.value_opt = None
        if self.value is not None:
            self.value_opt = torch.optim.AdamW(self.value.parameters(), lr=cfg.value_lr)
        self.steps_done = 0

    def current_block_size(self) -> int:
        if not self.cfg.block_schedule:
            return self.cfg.block_size
        return block_size_at(self.steps_done, self.cfg.block_schedule)

    @torch.no_grad()
    def rollout(self, prompts: Tensor, max_new_tokens: int, block_size: int):
        cfg = self.cfg
        self.policy.eval()
        return block_decode(
            self.policy, prompts, max_new_tokens, block_size=block_size, rule=cfg.rule,
            threshold=cfg.threshold, temperature=cfg.temperature, record=True,
            generator=self.generator,
        )  # fmt: skip

    def _chunks(self, n: int):
        for start in range(0, n, self.cfg.row_chunk):
            yield slice(start, min(n, start + self.cfg.row_chunk))

    def _logprobs(self, model, batch: TraceBatch, block_size: int) -> Tensor:
        parts = []
        for c in self._chunks(len(batch.noisy)):
            parts.append(
                trace_logprobs(
                    model, batch.noisy[c], batch.clean[c], batch.targets[c], block_size,
                    temperature=self.cfg.temperature,
                )
            )  # fmt: skip
        return torch.cat(parts)

    def _values(self, batch: TraceBatch, block_size: int) -> Tensor:
        parts = []
        for c in self._chunks(len(batch.noisy)):
            v = self.value(batch.noisy[c], batch.clean[c], block_size)
            parts.append(v[batch.targets[c]])
        return torch.cat(parts)

    def step(self, prompts: Tensor, answers: Tensor) -> dict[str, float]:
        """One RL step on ``prompts [B, P]`` with reference ``answers [B, A]``: ``group_size``
        rollouts of ``A`` new tokens per prompt, then the updates. Returns statistics."""
        cfg = self.cfg
        if prompts.dim() != 2 or answers.dim() != 2 or len(prompts) != len(answers):
            raise ValueError(
                f"TraceRL.step: prompts [B, P] and answers [B, A] with one B, got "
                f"{tuple(prompts.shape)} and {tuple(answers.shape)}"
            )
        bs = self.current_block_size()
        prompts_g = prompts.repeat_interleave(cfg.group_size, 0)
        answers_g = answers.repeat_interleave(cfg.group_size, 0)
        out = self.rollout(prompts_g, answers.shape[1], bs)
        p = prompts.shape[1]
        generated = torch.stack([s[p:] for s in out.sequences])
        rewards = self.reward_fn(generated, answers_g).float()
        batch = build_trace_batch(
            out.sequences, out.trajectory, bs, self.policy.mask_token_id, shrink=cfg.shrink
        )
        tok_sample = batch.sample[:, None].expand_as(batch.targets)[batch.targets]
        tok_step = batch.step_index[batch.targets]
        # weight of a token: 1 / (its response length x rollouts)
        weight = 1.0 / (batch.response_len[tok_sample].float() * len(rewards))
        with torch.no_grad():
            logp_old = self._logprobs(self.policy, batch, bs)
            logp_ref = (
                self._logprobs(self.reference, batch, bs) if self.reference is not None else None
            )
        stats: dict[str, float] = {"reward": float(rewards.mean()), "block_size": float(bs)}
        stats["tpf"] = out.tokens_per_forward
        if cfg.advantage == "group":
            adv = group_advantages(rewards, cfg.group_size)[tok_sample]
        else:
            with torch.no_grad():
                values = self._values(batch, bs)
            adv, returns = torch.zeros_like(values), torch.zeros_like(values)
            for n in range(len(rewards)):
                sel = tok_sample == n
                adv[sel], returns[sel] = trace_gae(
                    tok_step[sel], values[sel], float(rewards[n]), int(batch.num_steps[n]),
                    cfg.gamma, cfg.lam,
                )  # fmt: skip
            stats["value_loss"] = self._update_value(batch, bs, returns, weight)
        self.policy.train()
        for _ in range(cfg.ppo_epochs):
            logp = self._logprobs(self.policy, batch, bs)
            ratio = importance_ratio(logp, logp_old)
            surrogate = clipped_objective(ratio, adv, cfg.clip_eps)
            loss = -(surrogate * weight).sum()
            if logp_ref is not None:
                kl = kl_k3(logp, logp_ref)
                loss = loss + cfg.kl_coef * (kl * weight).sum()
                stats["kl"] = float((kl * weight).sum().detach())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.opt.step()
            stats["loss"] = float(loss.detach())
            stats["clip_frac"] = float(((ratio - 1).abs() > cfg.clip_eps).float().mean())
        self.policy.eval()
        self.steps_done += 1
        return stats

    def _update_value(self, batch: TraceBatch, bs: int, returns: Tensor, weight: Tensor) -> float:
        self.value.train()
        v = self._values(batch, bs)
        loss = 0.5 * ((v - returns) ** 2 * weight).sum()
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.value.parameters(), self.cfg.max_grad_norm)
        self.value_opt.step()
        self.value.eval()
        return float(loss.detach())
