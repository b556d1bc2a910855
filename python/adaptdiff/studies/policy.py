"""The diffusion-policy study (``adaptdiff study policy``): on a synthetic 2-D manipulation task,
does a MoDE policy (noise-routed experts) match a dense Diffusion Policy transformer at lower
active compute, and do expert caching (MoDE) and block caching (BAC) keep the success rate while
cutting the latency of an action chunk?

Per seed:

- 200 scripted-expert demonstrations of the task (:mod:`adaptdiff.data.reach_push`; ``reach``:
  around an obstacle, left or right at random) are cut into (2 observations, 16 actions) pairs.
- Two :class:`~adaptdiff.models.DiffusionPolicyTransformer` s are trained with the same
  recipe (x0 prediction, clipped to [-1, 1] when sampling; cosine VP schedule of 100 steps;
  AdamW): ``dense`` (SwiGLU of width
  ``4 dim``) and ``MoDE`` (4 experts of width ``dim``, top-2 routed on the noise level: half
  the dense feed-forward's active compute, the same total feed-forward parameters), the latter
  with MoDE's load-balancing loss (weight 0.01).
- Every method samples chunks with 10 DDIM steps and executes 8 actions before replanning
  (receding horizon), on the same ``episodes`` evaluation episodes:
  ``dense``; ``MoDE`` (routed); ``MoDE + expert cache``
  (:func:`~adaptdiff.models.precompute_experts` for the 10 steps: one fused dense SwiGLU per
  step, no router);
  ``dense + BAC`` (a BAC schedule, :func:`~adaptdiff.accel.caching.producers.bac_schedule`,
  searched on features of one sampling run over training observations, applied with
  ``accel.apply``); ``dense + uniform`` (every other step reuses every block: the same
  schedule machinery at about the same compute, BAC's baseline).

Reported per method: success rate, obstacle contacts, the episodes that succeed passing left
of the obstacle (mode balance: the expert passes left in half its successes), the median wall
time of one chunk at batch 1 (one thread), multiply-adds per chunk (the blocks; embeddings left
out) and the feed-forward parameters one token uses.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import accel
from .._pyplot import pyplot
from ..accel.caching.producers import bac_schedule, collect_features, interval_schedule
from ..data import reach_push
from ..models import NoiseRoutedMoE, moe_aux_loss, precompute_experts
from ..models.policy import DiffusionPolicyTransformer, PolicyConfig, ffn_flops
from ..samplers import VPSchedule, sample
from .runner import Column, Metrics, Progress, Study, Summary

METHODS = ("dense", "MoDE", "MoDE + expert cache", "dense + BAC", "dense + uniform")


@dataclass
class PolicyStudyConfig:
    task: str = "reach"
    demos: int = 200
    dim: int = 32
    depth: int = 2
    num_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    horizon: int = 16
    n_obs_steps: int = 2
    action_steps: int = 8
    train_steps: int = 1000
    batch: int = 128
    lr: float = 1e-3
    sample_steps: int = 10
    bac_budget: float = 0.5
    episodes: int = 100
    latency_repeats: int = 20
    threads: int = 1


def _quick(cfg: PolicyStudyConfig) -> PolicyStudyConfig:
    return dataclasses.replace(
        cfg, demos=20, dim=32, depth=2, train_steps=30, batch=64, sample_steps=5, episodes=8,
        latency_repeats=2,
    )  # fmt: skip


def schedule() -> VPSchedule:
    """The diffusion schedule every policy trains and samples with."""
    return VPSchedule("cosine", num_train_timesteps=100)


def policy_config(cfg: PolicyStudyConfig, moe: bool) -> PolicyConfig:
    return PolicyConfig(
        obs_dim=reach_push.OBS_DIM[cfg.task], action_dim=2, n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads,
        num_experts=cfg.num_experts if moe else 0, top_k=cfg.top_k,
    )  # fmt: skip


def train_policy(
    model: DiffusionPolicyTransformer,
    obs: torch.Tensor,
    actions: torch.Tensor,
    cfg: PolicyStudyConfig,
    g: torch.Generator,
) -> list[float]:
    """x0-prediction MSE (+ the MoE balance loss) with AdamW and a cosine learning rate;
    returns the loss every step."""
    sched = schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    lr_at = lambda i: cfg.lr * 0.5 * (1 + np.cos(np.pi * i / cfg.train_steps))  # noqa: E731
    model.train()
    losses = []
    for i in range(cfg.train_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        idx = torch.randint(0, len(obs), (cfg.batch,), generator=g)
        a0, o = actions[idx], obs[idx]
        t = sched.sample_t(cfg.batch, generator=g)
        eps = torch.randn(a0.shape, generator=g)
        alpha, sigma = sched.alpha_sigma(t)
        xt = alpha[:, None, None] * a0 + sigma[:, None, None] * eps
        loss = (model(xt, t, obs=o) - a0).pow(2).mean()
        total = loss + moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for layer in model.modules():  # drop the last batch's graph (kept by the MoE layers)
        if isinstance(layer, NoiseRoutedMoE):
            layer.noise_level, layer.aux = None, None
    return losses


@torch.no_grad()
def sample_actions(model, obs: torch.Tensor, steps: int, g: torch.Generator, accelerators=()):
    """One action chunk per row of ``obs [B, n_obs_steps, obs_dim]``: DDIM on the model's
    x0 prediction clipped to ``[-1, 1]`` at every step (Diffusion Policy's ``clip_sample``;
    without it the first step, where alpha is 5e-4 on the cosine schedule, blows errors up)."""
    cfg = model.config

    def clipped(x, t, obs):
        return model(x, t, obs=obs).clamp(-1, 1)

    return sample(
        clipped, (obs.shape[0], cfg.horizon, cfg.action_dim), method="ddim", steps=steps,
        schedule=schedule(), cond={"obs": obs}, prediction="x0", accelerators=accelerators,
        generator=g, progress=False,
    )  # fmt: skip


def _latencies(fns: dict, repeats: int) -> dict:
    """Median wall time in milliseconds of each ``fns[name]()``, measured round-robin (one
    call of each in turn, after one warm-up call each), so that a change of the machine's load
    affects every method alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def _macs_per_chunk(pcfg: PolicyConfig, steps: int, routed: bool, sched=None) -> float:
    """Multiply-adds of the blocks over one chunk's ``steps`` model calls; with a caching
    schedule, only the components it computes (the router's cost goes with the FFN)."""
    f = ffn_flops(pcfg, routed=routed)
    if sched is None:
        return float(steps * f["total"])
    costs = [[f["attn"] / pcfg.depth, (f["ffn"] + f["router"]) / pcfg.depth]] * pcfg.depth
    return float(steps * f["total"] * sched.compute_fraction(costs))


def _run_seed(cfg: PolicyStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)  # the runner restores the caller's
    return _seed(cfg, seed, out, progress)


def _seed(cfg: PolicyStudyConfig, seed: int, out: Path, progress: Progress) -> Metrics:
    episodes = reach_push.demonstrations(cfg.task, cfg.demos, seed)
    obs_np, act_np = reach_push.action_chunks(episodes, cfg.n_obs_steps, cfg.horizon)
    obs, actions = torch.from_numpy(obs_np), torch.from_numpy(act_np)
    models = {}
    for name, moe in (("dense", False), ("MoDE", True)):
        torch.manual_seed(seed)
        model = DiffusionPolicyTransformer(policy_config(cfg, moe))
        losses = train_policy(model, obs, actions, cfg, torch.Generator().manual_seed(seed))
        models[name] = model
        progress.advance(f"{name} trained, final loss {np.mean(losses[-50:]):.4f}")

    dense, mode = models["dense"], models["MoDE"]
    steps = cfg.sample_steps
    ts = schedule().timesteps(steps)[:-1]
    calib_obs = obs[torch.randperm(len(obs), generator=torch.Generator().manual_seed(seed))[:64]]
    feats = collect_features(
        dense, lambda: sample_actions(dense, calib_obs, steps, torch.Generator().manual_seed(seed))
    )
    components = accel.layout(dense)
    bac = bac_schedule(components, feats, budget=cfg.bac_budget, num_bu_blocks=1)
    uniform = interval_schedule(components, steps, 2, first_blocks=0, last_blocks=0)
    # method -> (model, its accelerators, caching schedule, experts fused); every method has
    # its own model object (copies), so they all stay ready for the round-robin timing
    setups = {"dense": (dense, [], None, False), "MoDE": (mode, [], None, False)}
    cached = copy.deepcopy(mode)
    precompute_experts(cached, ts)
    setups["MoDE + expert cache"] = (cached, [], None, True)
    for name, sched in (("dense + BAC", bac), ("dense + uniform", uniform)):
        model = copy.deepcopy(dense)
        setups[name] = (model, [accel.apply(model, accel.ScheduleConfig(sched))], sched, False)

    metrics: Metrics = {}
    chunk_fns = {}
    for name, (model, accs, sched, fused) in setups.items():
        g = torch.Generator().manual_seed(seed)

        def policy(o, model=model, accs=accs, g=g):
            obs_t = torch.from_numpy(o).float()
            return sample_actions(model, obs_t, steps, g, accs).numpy()

        res = reach_push.evaluate(
            policy, cfg.task, cfg.episodes, seed=10_000 + seed, n_obs_steps=cfg.n_obs_steps,
            action_steps=cfg.action_steps,
        )  # fmt: skip
        chunk_fns[name] = lambda model=model, accs=accs, g=g: sample_actions(
            model, obs[:1], steps, g, accs
        )
        pcfg = model.config
        metrics[name] = {
            "success": res["success"],
            "contacts": res["failed"] if cfg.task == "reach" else None,
            # successes passing left, per episode (the expert: half its success rate)
            "left": (res["left"] or 0.0) * res["success"] if cfg.task == "reach" else None,
            "mmacs": _macs_per_chunk(pcfg, steps, routed=not fused, sched=sched) / 1e6,
            "ffn_active": float(3 * pcfg.dim * pcfg.active_hidden * pcfg.depth),
        }
        progress.advance(f"{name}: success {res['success']:.0%}")
    for name, ms in _latencies(chunk_fns, cfg.latency_repeats).items():
        metrics[name]["latency_ms"] = ms
    metrics["dense + BAC"]["compute"] = bac.compute_fraction()
    metrics["dense + uniform"]["compute"] = uniform.compute_fraction()
    for name in ("dense", "MoDE", "MoDE + expert cache"):
        metrics[name]["compute"] = 1.0
    return metrics


def _plot(summary: Summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, row in summary.items():
        lat, suc = row["latency_ms"].values, row["success"].values
        ax.scatter(lat, suc, alpha=0.7, label=name)
    ax.set_xlabel("latency per chunk, batch 1 (ms)")
    ax.set_ylabel("success rate")
    ax.set_title("policy: success vs latency, one point per seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _note(cfg: PolicyStudyConfig) -> str:
    return (
        f"Task {cfg.task}: {cfg.demos} expert demonstrations; transformers of width {cfg.dim}, "
        f"depth {cfg.depth}, trained {cfg.train_steps} steps; {cfg.sample_steps} DDIM steps "
        f"per chunk of {cfg.horizon}, {cfg.action_steps} executed; {cfg.episodes} evaluation "
        "episodes. success: goal reached; contacts: episodes ended by touching the obstacle; "
        "left: episodes succeeding left of the obstacle (the expert: half its successes); "
        "ms: median time of one chunk at batch 1, one thread; MMACs: multiply-adds of the "
        "blocks per chunk; FFN active: feed-forward weights a token uses; compute: share of "
        "block components computed (caching schedules)."
    )


STUDY = Study(
    name="policy",
    summary="diffusion policies: dense vs MoDE, expert caching and BAC block caching",
    config=PolicyStudyConfig,
    quick=_quick,
    run=_run_seed,
    columns=(
        Column("success", "success", "{:.0%}"),
        Column("contacts", "contacts", "{:.0%}"),
        Column("left", "left", "{:.0%}"),
        Column("latency_ms", "ms", "{:.1f}"),
        Column("mmacs", "MMACs", "{:.1f}"),
        Column("ffn_active", "FFN active", "{:.0f}"),
        Column("compute", "compute", "{:.0%}"),
    ),
    plot=_plot,
    units=lambda cfg: 2 + len(METHODS),
    note=_note,
)
