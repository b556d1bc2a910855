"""The synthetic reach / push task: determinism, physics, the scripted expert, the chunks."""

import numpy as np
import pytest

from adaptdiff.data import reach_push
from adaptdiff.data.reach_push import ReachPush, action_chunks, demonstrations, evaluate


def _random_policy(seed):
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(-1, 1, (obs.shape[0], 8, 2))


def test_episodes_are_deterministic_given_the_seed():
    a, b, c = (ReachPush("push", 5, s).reset() for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d1, d2 = demonstrations("reach", 6, 7), demonstrations("reach", 6, 7)
    for e1, e2 in zip(d1, d2, strict=True):
        assert np.array_equal(e1.actions, e2.actions) and e1.mode == e2.mode


@pytest.mark.parametrize("task", reach_push.TASKS)
def test_the_expert_succeeds_and_a_random_policy_fails(task):
    eps = demonstrations(task, 100, 0)
    assert np.mean([e.success for e in eps]) >= 0.95
    assert max(len(e.actions) for e in eps) <= reach_push.MAX_STEPS[task]
    if task == "reach":  # bimodal: both sides of the obstacle, about half each
        left = np.mean([e.mode < 0 for e in eps])
        assert 0.3 < left < 0.7
    res = evaluate(_random_policy(1), task, 100, seed=1)
    assert res["success"] <= 0.05


def test_straight_to_the_goal_hits_the_obstacle():
    def straight(obs):  # normalised [agent, goal]: head for the goal at full speed
        a = np.clip(8 * (obs[:, -1, 2:4] - obs[:, -1, :2]), -1, 1)
        return np.repeat(a[:, None], 8, 1)

    res = evaluate(straight, "reach", 50, seed=2)
    assert res["success"] == 0.0 and res["failed"] == 1.0 and res["left"] is None


def test_push_moves_the_block_along_the_normal_by_the_penetration():
    env = ReachPush("push", 1, 0)
    env.reset()
    env.block = np.array([[0.5, 0.5]])
    env.agent = np.array([[0.5, 0.5 - reach_push.BLOCK_R - 0.01]])
    env.step(np.array([[0.0, 1.0]]))  # 0.03 up: 0.02 inside the block
    assert env.agent[0, 1] == pytest.approx(0.5 - reach_push.BLOCK_R + 0.02)
    assert env.block[0] == pytest.approx([0.5, 0.5 + reach_push.FRICTION * 0.02])


def test_finished_episodes_stop_moving():
    env = ReachPush("reach", 2, 0, max_steps=3)
    env.reset()
    for _ in range(3):
        env.step(np.zeros((2, 2)))
    before = env.agent.copy()
    env.step(np.ones((2, 2)))
    assert env.done.all() and np.array_equal(env.agent, before)
    assert (env.steps == 3).all()


def test_action_chunks_windows_and_padding():
    eps = demonstrations("reach", 3, 0)
    obs, act = action_chunks(eps, n_obs_steps=2, horizon=4)
    L0 = len(eps[0].actions)
    assert obs.shape == (sum(len(e.actions) for e in eps), 2, 4) and act.shape[1:] == (4, 2)
    assert obs.dtype == np.float32 and obs.min() >= -1 and obs.max() <= 1
    first = eps[0]
    assert np.allclose(obs[0, 0], obs[0, 1])  # the first observation repeated before the start
    assert np.allclose(obs[5], 2 * first.obs[4:6] - 1)
    assert np.allclose(act[5], first.actions[5:9])
    assert np.allclose(act[L0 - 1], np.repeat(first.actions[-1:], 4, 0))  # past the end


def test_bad_inputs_name_the_function():
    with pytest.raises(ValueError, match="ReachPush: task must be one of"):
        ReachPush("fly", 1, 0)
    with pytest.raises(ValueError, match=r"ReachPush.step: actions must be \[2, 2\]"):
        env = ReachPush("reach", 2, 0)
        env.reset()
        env.step(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="evaluate: policy must return"):
        evaluate(lambda o: np.zeros((o.shape[0], 2, 2)), "reach", 2, 0, action_steps=8)
    with pytest.raises(ValueError, match="demonstrations: episodes must be >= 1"):
        demonstrations("push", 0, 0)
