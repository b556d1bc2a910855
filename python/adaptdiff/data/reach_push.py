"""A synthetic 2-D manipulation task for diffusion policies, in numpy: reach around an obstacle
(bimodal: the expert goes left or right of it at random) and push a block to a target.

The arena is ``[0, 1]^2``; a point agent moves by ``x <- x + 0.03 a`` with a velocity action
``a`` clipped to ``[-1, 1]^2``. :class:`ReachPush` runs ``n`` episodes at once (vectorised);
everything random is drawn from a ``numpy.random.Generator`` seeded by the caller, so a seed
gives the same episodes.

- ``task="reach"``: start near the bottom centre, goal near the top centre, a disk obstacle of
  radius 0.12 at the centre. Success: within 0.03 of the goal within ``max_steps`` (80) without
  ever touching the obstacle (a touch ends the episode as a failure). Observation:
  ``[agent x, agent y, goal x, goal y]``.
- ``task="push"``: a disk block of radius 0.05 and a target point. When the agent is inside the
  block, the block moves along the centre normal by 0.9 of the penetration depth (friction
  0.9). Success: block centre within 0.05 of the target within ``max_steps`` (80).
  Observation: ``[agent x, agent y, block x, block y, target x, target y]``.

:func:`expert_actions` is the scripted expert (reach: a waypoint beside the obstacle, left or
right with probability 1/2, then the goal; push: get behind the block, re-approaching when the
angle error exceeds 30 degrees, then push along block -> target), :func:`demonstrations` records
its episodes, :func:`action_chunks` cuts them into (observation window, action chunk) training
pairs, and :func:`evaluate` rolls out a chunking policy (receding horizon) and reports success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TASKS",
    "ReachPush",
    "action_chunks",
    "demonstrations",
    "evaluate",
    "expert_actions",
]

TASKS = ("reach", "push")
SPEED = 0.03  # arena units per step at |a| = 1
OBSTACLE, OBSTACLE_R = np.array([0.5, 0.5]), 0.12
GOAL_TOL = 0.03
BLOCK_R, TARGET_TOL, FRICTION = 0.05, 0.05, 0.9
MAX_STEPS = {"reach": 80, "push": 80}
OBS_DIM = {"reach": 4, "push": 6}


def _check_task(task: str, where: str) -> None:
    if task not in TASKS:
        raise ValueError(f"{where}: task must be one of {TASKS}, got {task!r}")


class ReachPush:
    """``n`` episodes of one task, stepped together.

    ``reset() -> obs [n, obs_dim]``; ``step(actions [n, 2]) -> obs``. Finished episodes (success
    or failure) stay where they are. ``success``, ``failed`` (touched the obstacle, reach only),
    ``done`` and ``steps`` are ``[n]`` arrays; ``side`` is, for reach, -1 / +1 for the side of
    the obstacle the agent passed (its x left or right of the centre when level with it, 0 while
    not yet level).
    """

    def __init__(self, task: str, n: int, seed: int, max_steps: int | None = None):
        _check_task(task, "ReachPush")
        if n < 1:
            raise ValueError(f"ReachPush: n must be >= 1, got {n}")
        self.task, self.n = task, n
        self.max_steps = MAX_STEPS[task] if max_steps is None else max_steps
        self.obs_dim = OBS_DIM[task]
        self.rng = np.random.default_rng(seed)

    def reset(self) -> np.ndarray:
        n, rng = self.n, self.rng
        self.agent = np.stack([0.5 + rng.uniform(-0.1, 0.1, n), rng.uniform(0.08, 0.14, n)], 1)
        if self.task == "reach":
            self.goal = np.stack([0.5 + rng.uniform(-0.1, 0.1, n), rng.uniform(0.85, 0.9, n)], 1)
        else:
            self.block = np.stack([rng.uniform(0.35, 0.65, n), rng.uniform(0.4, 0.55, n)], 1)
            self.target = np.stack([rng.uniform(0.25, 0.75, n), rng.uniform(0.75, 0.85, n)], 1)
        self.success = np.zeros(n, dtype=bool)
        self.failed = np.zeros(n, dtype=bool)
        self.steps = np.zeros(n, dtype=np.int64)
        self.side = np.zeros(n, dtype=np.int64)
        self._update()
        return self.obs()

    @property
    def done(self) -> np.ndarray:
        return self.success | self.failed | (self.steps >= self.max_steps)

    def obs(self) -> np.ndarray:
        if self.task == "reach":
            return np.concatenate([self.agent, self.goal], 1)
        return np.concatenate([self.agent, self.block, self.target], 1)

    def step(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.n, 2):
            raise ValueError(f"ReachPush.step: actions must be [{self.n}, 2], got {actions.shape}")
        live = ~self.done
        move = SPEED * np.clip(actions, -1.0, 1.0) * live[:, None]
        self.agent = np.clip(self.agent + move, 0.0, 1.0)
        if self.task == "push":
            d = self.block - self.agent
            dist = np.linalg.norm(d, axis=1)
            inside = live & (dist < BLOCK_R)
            normal = d / np.maximum(dist, 1e-9)[:, None]
            push = FRICTION * (BLOCK_R - dist)[:, None] * normal * inside[:, None]
            self.block = np.clip(self.block + push, 0.0, 1.0)
        self.steps += live
        self._update(live)
        return self.obs()

    def _update(self, live: np.ndarray | None = None) -> None:
        live = np.ones(self.n, dtype=bool) if live is None else live
        if self.task == "reach":
            hit = np.linalg.norm(self.agent - OBSTACLE, axis=1) < OBSTACLE_R
            self.failed |= live & hit & ~self.success
            level = (self.side == 0) & (np.abs(self.agent[:, 1] - OBSTACLE[1]) < 0.05)
            self.side[level] = np.where(self.agent[level, 0] < OBSTACLE[0], -1, 1)
            reached = np.linalg.norm(self.agent - self.goal, axis=1) < GOAL_TOL
        else:
            reached = np.linalg.norm(self.block - self.target, axis=1) < TARGET_TOL
        self.success |= live & reached & ~self.failed


def _towards(x: np.ndarray, w: np.ndarray, gain: float = 8.0) -> np.ndarray:
    return np.clip(gain * (w - x), -1.0, 1.0)


def expert_actions(env: ReachPush, modes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The scripted expert's actions ``[n, 2]`` for the current state of ``env``.

    ``modes [n]`` (reach: -1 / +1, the side of the obstacle) is the expert's per-episode choice;
    its ``phase`` is kept on ``env`` (``env.expert_phase``). Gaussian action noise of std 0.05.
    """
    if not hasattr(env, "expert_phase") or env.expert_phase.shape != (env.n,):
        env.expert_phase = np.zeros(env.n, dtype=np.int64)
    x = env.agent
    if env.task == "reach":
        way = np.stack([OBSTACLE[0] + 0.25 * modes, np.full(env.n, OBSTACLE[1])], 1)
        near = np.linalg.norm(way - x, axis=1) < 0.05
        env.expert_phase[near] = 1
        w = np.where(env.expert_phase[:, None] == 1, env.goal, way)
        a = _towards(x, w)
    else:
        to_target = env.target - env.block
        u = to_target / np.maximum(np.linalg.norm(to_target, axis=1), 1e-9)[:, None]
        behind = env.block - 0.08 * u
        rel = env.block - x
        rel_n = rel / np.maximum(np.linalg.norm(rel, axis=1), 1e-9)[:, None]
        aligned = (rel_n * u).sum(1) > np.cos(np.deg2rad(30.0))
        close = np.linalg.norm(rel, axis=1) < 0.1
        pushing = aligned & close
        # approach: go round the block (a side point) when not behind it, then behind it
        perp = np.stack([-u[:, 1], u[:, 0]], 1)
        sign = np.where((perp * (x - env.block)).sum(1) >= 0, 1.0, -1.0)[:, None]
        side = env.block + 0.1 * sign * perp - 0.08 * u
        in_front = ((x - env.block) * u).sum(1) > -0.04
        w = np.where(in_front[:, None], side, behind)
        a = _towards(x, w)
        a = np.where(pushing[:, None], _towards(x, env.block - 0.02 * u, gain=20.0), a)
    a = a + rng.normal(0.0, 0.05, a.shape)
    return np.clip(a, -1.0, 1.0)


@dataclass
class Episode:
    """One recorded episode: ``obs [L + 1, obs_dim]`` (the last after the last action),
    ``actions [L, 2]``, whether it succeeded and its mode (reach: -1 / +1; push: 0)."""

    obs: np.ndarray
    actions: np.ndarray
    success: bool
    mode: int


def demonstrations(task: str, episodes: int, seed: int) -> list[Episode]:
    """``episodes`` runs of the scripted expert (successful or not; see ``Episode.success``)."""
    _check_task(task, "demonstrations")
    if episodes < 1:
        raise ValueError(f"demonstrations: episodes must be >= 1, got {episodes}")
    rng = np.random.default_rng(seed)
    env = ReachPush(task, episodes, seed=int(rng.integers(2**31)))
    obs = [env.reset()]
    modes = rng.choice([-1, 1], size=episodes) if task == "reach" else np.zeros(episodes, int)
    acts, ends = [], np.full(episodes, -1)
    while not env.done.all():
        a = expert_actions(env, modes, rng)
        alive = ~env.done
        obs.append(env.step(a))
        acts.append(a)
        ends[alive & env.done] = len(acts)
    ends[ends < 0] = len(acts)
    O, A = np.stack(obs, 1), np.stack(acts, 1)
    return [
        Episode(O[i, : ends[i] + 1], A[i, : ends[i]], bool(env.success[i]), int(modes[i]))
        for i in range(episodes)
    ]


def normalize_obs(obs: np.ndarray) -> np.ndarray:
    """Positions in ``[0, 1]`` to ``[-1, 1]`` (actions already live there)."""
    return 2.0 * np.asarray(obs) - 1.0


def action_chunks(
    episodes: list[Episode], n_obs_steps: int = 2, horizon: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Training pairs from every step ``t`` of every successful episode: the observations
    ``t - n_obs_steps + 1 .. t`` (the first repeated before the start) and the actions
    ``t .. t + horizon - 1`` (the last repeated past the end), normalised to ``[-1, 1]``:
    ``(obs [N, n_obs_steps, obs_dim], actions [N, horizon, 2])`` float32."""
    if n_obs_steps < 1 or horizon < 1:
        raise ValueError(
            f"action_chunks: n_obs_steps and horizon must be >= 1, got {n_obs_steps}, {horizon}"
        )
    obs_out, act_out = [], []
    for ep in episodes:
        if not ep.success or len(ep.actions) == 0:
            continue
        L = len(ep.actions)
        t = np.arange(L)
        oi = np.clip(t[:, None] + np.arange(-n_obs_steps + 1, 1)[None], 0, L)
        ai = np.clip(t[:, None] + np.arange(horizon)[None], 0, L - 1)
        obs_out.append(normalize_obs(ep.obs[oi]))
        act_out.append(ep.actions[ai])
    if not obs_out:
        raise ValueError("action_chunks: no successful episode")
    return (
        np.concatenate(obs_out).astype(np.float32),
        np.concatenate(act_out).astype(np.float32),
    )


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    task: str,
    episodes: int,
    seed: int,
    *,
    n_obs_steps: int = 2,
    action_steps: int = 8,
    max_steps: int | None = None,
) -> dict:
    """Roll out a chunking policy on ``episodes`` episodes at once (receding horizon).

    ``policy(obs [n, n_obs_steps, obs_dim] normalised) -> actions [n, >= action_steps, 2]``;
    the first ``action_steps`` actions are executed, then it is called again. Returns
    ``success`` (rate), ``failed`` (touched the obstacle), ``left`` (reach: share of the
    successes that passed left of the obstacle; None without successes), ``policy_calls`` and
    ``steps`` (mean episode length).
    """
    _check_task(task, "evaluate")
    if action_steps < 1:
        raise ValueError(f"evaluate: action_steps must be >= 1, got {action_steps}")
    env = ReachPush(task, episodes, seed, max_steps)
    history = [env.reset()] * n_obs_steps
    calls = 0
    while not env.done.all():
        window = normalize_obs(np.stack(history[-n_obs_steps:], 1))
        chunk = np.asarray(policy(window), dtype=np.float64)
        if chunk.ndim != 3 or chunk.shape[0] != episodes or chunk.shape[1] < action_steps:
            raise ValueError(
                f"evaluate: policy must return [{episodes}, >= {action_steps}, 2], got "
                f"{chunk.shape}"
            )
        calls += 1
        for k in range(action_steps):
            history.append(env.step(chunk[:, k]))
            if env.done.all():
                break
    ok = env.success
    left = float((env.side[ok] < 0).mean()) if ok.any() else None
    return {
        "success": float(ok.mean()),
        "failed": float(env.failed.mean()),
        "left": left,
        "policy_calls": calls,
        "steps": float(env.steps.mean()),
    }
