"""TraceRL: the objective's pieces against hand-computed cases, the trace rows against the
decoder's own log-probabilities, and one RL step on a native and on converted HF models."""

import math
import os

import pytest
import torch

from adaptdiff.samplers import block_decode
from adaptdiff.samplers.block_decode import TraceStep
from adaptdiff.train.tracerl import (
    TraceRL,
    TraceRLConfig,
    ValueModel,
    block_size_at,
    build_trace_batch,
    clipped_objective,
    group_advantages,
    importance_ratio,
    kl_k3,
    shrink_steps,
    step_gae,
    step_map,
    trace_gae,
    trace_logprobs,
    trace_rounds,
)
from tests.support.models import tiny_block_lm

V = 19
M = V - 1  # the tiny models' [MASK] id


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- trajectories to rows


def test_step_map_and_shrink():
    traj = [TraceStep(0, 5, 3, -0.1, 0.0), TraceStep(1, 4, 7, -0.2, 0.0)]
    assert step_map(traj, 8).tolist() == [-1, -1, -1, -1, 1, 0, -1, -1]
    with pytest.raises(ValueError, match="step_map: position 9"):
        step_map([TraceStep(0, 9, 3, 0.0, 0.0)], 8)
    steps = torch.tensor([2, 1, 1, 3, 5, 4, 6, 7, -1, -1, 9, 8])
    assert shrink_steps(steps, 4, 1).tolist() == steps.tolist()
    # block 1: distinct 1,2,3 -> {1,2}->1, {3}->3; block 2: {4,5}->4, {6,7}->6
    assert shrink_steps(steps, 4, 2).tolist() == [1, 1, 1, 3, 4, 4, 6, 6, -1, -1, 8, 8]
    assert shrink_steps(steps, 4, 4).tolist() == [1, 1, 1, 1, 4, 4, 4, 4, -1, -1, 8, 8]


def test_trace_rounds_reproduce_the_decoder_states():
    # the paper's example (one block, step ids [2, 1, 1, 3]) after a prompt block, and a
    # second generated block with two steps
    tokens = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17])
    steps = torch.tensor([-1, -1, -1, -1, 2, 1, 1, 3, 4, 5, 5, 4])
    noisy, targets = trace_rounds(tokens, steps, 4, M)
    assert noisy.tolist() == [
        [0, 1, 2, 3, M, M, M, M, M, M, M, M],
        [0, 1, 2, 3, M, 11, 12, M, 14, M, M, 17],
        [0, 1, 2, 3, 10, 11, 12, M, 14, 15, 16, 17],
    ]
    assert targets.int().tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
    ]
    with pytest.raises(ValueError, match="trace_rounds: block_size"):
        trace_rounds(tokens, steps, 5, M)


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_trace_logprobs_equal_the_decoders(block_size):
    """Recomputed in the bd3 layout, the committed tokens' log-probabilities are the ones the
    cached decoder sampled them with: the rows hold exactly the context the decoder saw."""
    model = tiny_block_lm(V, seed=0, sharpen=16)
    prompt = torch.randint(0, M, (3, 6), generator=torch.Generator().manual_seed(0))
    out = block_decode(
        model, prompt, 9, block_size=block_size, temperature=1.0, threshold=0.2, record=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.tokens_per_forward > 1  # several tokens share a step
    batch = build_trace_batch(out.sequences, out.trajectory, block_size, M)
    logp = trace_logprobs(model, batch.noisy, batch.clean, batch.targets, block_size)
    sample = batch.sample[:, None].expand_as(batch.targets)[batch.targets]
    pos = torch.arange(batch.targets.shape[1]).expand_as(batch.targets)[batch.targets]
    recorded = {(r, t.position): t.logprob for r, tr in enumerate(out.trajectory) for t in tr}
    want = torch.tensor([recorded[(int(r), int(p))] for r, p in zip(sample, pos, strict=True)])
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)
    # every generated token is a target exactly once, tokens past the cut are none
    assert batch.response_len.tolist() == [9, 9, 9]
    assert [int((sample == r).sum()) for r in range(3)] == [9, 9, 9]
    assert int(pos.max()) < 6 + 9
    # step_index ranks each rollout's steps 0..num_steps-1
    for r in range(3):
        index = batch.step_index[batch.sample == r]
        assert set(index[index >= 0].tolist()) == set(range(int(batch.num_steps[r])))


# ---------------------------------------------------------------- the objective's pieces


def test_importance_ratio_and_clipping():
    ratio = importance_ratio(torch.tensor([math.log(0.5), 0.0, 20.0]), torch.tensor([
        math.log(0.25), 0.0, 0.0]))  # fmt: skip
    torch.testing.assert_close(ratio, torch.tensor([2.0, 1.0, math.exp(10.0)]))
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    got = clipped_objective(ratio, adv, 0.2)
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0, 1.2, -1.5, -0.8]))
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_objective(ratio, adv, -0.1)


def test_kl_k3_values_and_unbiased():
    got = kl_k3(torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0]))
    torch.testing.assert_close(got, torch.tensor([0.5 + math.log(2) - 1, 0.0]))
    # E_{x~p}[k3] = KL(p || q), by exact enumeration of a categorical
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    expected = (p * kl_k3(p.log(), q.log())).sum()
    torch.testing.assert_close(expected, (p * (p / q).log()).sum())


def test_group_advantages():
    got = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    torch.testing.assert_close(got, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-5,
                               rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="group_advantages"):
        group_advantages(torch.ones(6), 4)


def test_step_gae():
    rewards, values = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.2, 0.5, 0.6])
    adv, ret = step_gae(rewards, values)  # γ = λ = 1: returns are the reward
    torch.testing.assert_close(adv, torch.tensor([0.8, 0.5, 0.4]))
    torch.testing.assert_close(ret, torch.ones(3))
    adv, ret = step_gae(rewards, values, gamma=0.5, lam=0.5)
    # A2 = 1 - .6; A1 = .5*.6 - .5 + .25*A2 = -.1; A0 = .5*.5 - .2 + .25*A1 = .025
    torch.testing.assert_close(adv, torch.tensor([0.025, -0.1, 0.4]))
    torch.testing.assert_close(ret, torch.tensor([0.225, 0.4, 1.0]))


def test_trace_gae_tokens_share_their_steps_target():
    step = torch.tensor([0, 0, 1, 2])
    v = torch.tensor([0.1, 0.3, 0.5, 0.6])  # step values 0.2, 0.5, 0.6
    adv, ret = trace_gae(step, v, 1.0, 3)
    torch.testing.assert_close(adv, 1.0 - v)
    torch.testing.assert_close(ret, torch.ones(4))
    adv, ret = trace_gae(step, v, 1.0, 3, gamma=0.5, lam=0.5)
    # step 0 tokens: .5 * V1 + .25 * A1 - v = .225 - v; step 1: .5*.6 + .25*.4 - .5; step 2
    torch.testing.assert_close(adv, torch.tensor([0.125, -0.075, -0.1, 0.4]))
    torch.testing.assert_close(ret, adv + v)
    with pytest.raises(ValueError, match="trace_gae: step_index"):
        trace_gae(torch.tensor([3]), torch.tensor([0.0]), 1.0, 3)


def test_block_size_schedule():
    sched = ((0, 4), (10, 8), (20, 16))
    assert [block_size_at(s, sched) for s in (0, 9, 10, 19, 20, 99)] == [4, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="start at step 0"):
        block_size_at(0, ((1, 4),))
    with pytest.raises(ValueError, match="must increase"):
        block_size_at(0, ((0, 4), (0, 8)))


def test_value_model_starts_at_zero_and_is_a_separate_copy():
    model = tiny_block_lm(V, seed=0)
    value = ValueModel(model)
    ids = torch.randint(0, M, (2, 8))
    assert torch.equal(value(ids, ids, 4), torch.zeros(2, 8))
    assert value.backbone is not model
    assert value.backbone.tok_embeddings.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_config_errors():
    with pytest.raises(ValueError, match="advantage must be one of"):
        TraceRLConfig(advantage="none")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TraceRLConfig(temperature=0.0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        TraceRLConfig(group_size=0)
    with pytest.raises(ValueError, match="TraceRL.step: prompts"):
        TraceRL(tiny_block_lm(V), lambda g, a: g[:, 0] * 0.0).step(
            torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)
        )


# ---------------------------------------------------------------- one RL step


def even_reward(generated, answers):  # differs between rollouts, so advantages do too
    return (generated % 2 == 0).float().mean(1)


def _one_step(model, advantage, **kw):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    cfg = TraceRLConfig(group_size=4, advantage=advantage, threshold=0.3, lr=1e-3, **kw)
    rl = TraceRL(model, even_reward, cfg, generator=g)
    prompts = torch.randint(0, M, (3, 6), generator=g)
    answers = torch.randint(0, M, (3, 4), generator=g)
    stats = rl.step(prompts, answers)
    stats2 = rl.step(prompts, answers)
    changed = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    return stats, stats2, changed, rl


@pytest.mark.parametrize("advantage", ["value", "group"])
def test_one_step_on_block_lm_changes_parameters(advantage):
    model = tiny_block_lm(V, seed=0, sharpen=2)
    stats, stats2, changed, rl = _one_step(model, advantage, ppo_epochs=2)
    for s in (stats, stats2):
        assert math.isfinite(s["loss"]) and math.isfinite(s["kl"]) and s["kl"] >= 0
    assert changed > 0
    if advantage == "value":
        assert math.isfinite(stats["value_loss"])
    else:
        assert rl.value is None


def test_block_schedule_enlarges_the_rollout_block():
    model = tiny_block_lm(V, seed=0, sharpen=2)
    stats, stats2, _, _ = _one_step(model, "group", block_schedule=((0, 2), (1, 4)), kl_coef=0.0)
    assert (stats["block_size"], stats2["block_size"]) == (2.0, 4.0)
    assert "kl" not in stats


@pytest.mark.parametrize("family", ["Qwen2", "Llama"])
def test_one_step_on_a_converted_hf_model(family):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from adaptdiff.models import block_lm_from_hf

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=M, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
    )  # fmt: skip
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    model = block_lm_from_hf(hf)  # [MASK] appended as id M
    assert model.mask_token_id == M and model.config.vocab_size == V
    hf_before = {k: v.clone() for k, v in hf.state_dict().items()}
    stats, _, changed, _ = _one_step(model, "value")
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["value_loss"]) and changed > 0
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in hf_before.items())
