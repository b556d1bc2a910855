import pytest
import torch

from adaptdiff.samplers import ar_decode, block_decode
from adaptdiff.samplers.block_decode import (
    RULES,
    sample_tokens,
    schedule_count,
    select_tokens,
)
from tests.support.models import tiny_block_lm

V = 17


@pytest.fixture(scope="module")
def model():
    return tiny_block_lm(V, sharpen=15)  # peaked, varied distributions: ties would be vacuous


def prompts(b, n, seed=0):
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# selection rules
# ---------------------------------------------------------------------------------------------


def test_schedule_count_spreads_the_masks_over_the_steps():
    for n in range(0, 9):
        for steps in (1, 3, 4):
            ks = [
                int(schedule_count(torch.tensor([n]), torch.tensor([s]), steps))
                for s in range(steps)
            ]
            assert sum(ks) == n and max(ks) - min(ks) <= 1 and ks == sorted(ks, reverse=True)


def _select(rule, conf, masked=None, k=1, **kw):
    conf = torch.tensor([conf])
    masked = torch.ones_like(conf, dtype=torch.bool) if masked is None else torch.tensor([masked])
    entropy = kw.pop("entropy", 1 - conf)
    entropy = torch.as_tensor(entropy, dtype=torch.float32).reshape(conf.shape)
    margin = kw.pop("margin", conf)
    margin = torch.as_tensor(margin, dtype=torch.float32).reshape(conf.shape)
    out = select_tokens(rule, masked, conf, entropy, margin, torch.tensor([k]), **kw)
    return out[0].nonzero().squeeze(1).tolist()


def test_rules_pick_the_documented_positions():
    conf = [0.2, 0.95, 0.5, 0.92, 0.1]
    assert _select("static", conf, k=2) == [1, 3]
    assert _select("sequential", conf, k=2) == [0, 1]
    assert _select("threshold", conf, threshold=0.9) == [1, 3]
    assert _select("threshold", conf, threshold=0.99) == [1]  # top-1 floor
    assert _select("threshold_k", conf, k=3, threshold=0.9) == [1, 2, 3]  # at least k
    assert _select("threshold_k", conf, k=1, threshold=0.4) == [1, 2, 3]
    # entropy-bounded: lowest entropies first while their sum stays <= bound
    ent = [0.5, 0.05, 0.3, 0.1, 2.0]
    assert _select("entropy", conf, entropy=ent, entropy_bound=0.5) == [1, 2, 3]
    assert _select("entropy", conf, entropy=ent, entropy_bound=0.01) == [1]
    margin = [0.9, 0.1, 0.6, 0.2, 0.0]
    assert _select("margin", conf, margin=margin, threshold=0.5) == [0, 2]


def test_rules_only_touch_masked_positions_and_unmask_at_least_one():
    conf = [0.99, 0.3, 0.98, 0.2]
    masked = [False, True, False, True]
    for rule in RULES:
        got = _select(rule, conf, masked=masked, k=1, threshold=0.5)
        assert got and set(got) <= {1, 3}, rule
    assert _select("static", conf, masked=masked, k=5) == [1, 3]  # capped by the masks
    with pytest.raises(ValueError, match="rule"):
        _select("nope", conf)


def test_sample_tokens_greedy_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tok, conf, ent, margin = sample_tokens(logits)
    p = logits.softmax(-1)
    assert tok.tolist() == [0] and torch.allclose(conf, p[:, 0])
    assert torch.allclose(ent, -(p * p.log()).sum(-1)) and torch.allclose(margin, p[:, 0] - p[:, 1])
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.expand(500, 4), temperature=1.0, top_k=2, generator=g)[0]
    assert set(draws.tolist()) == {0, 1}
    draws = sample_tokens(logits.expand(500, 4), temperature=1.0, top_p=0.5, generator=g)[0]
    assert set(draws.tolist()) == {0}  # p(0) = 0.64 >= 0.5 alone


# ---------------------------------------------------------------------------------------------
# decoding invariants
# ---------------------------------------------------------------------------------------------


CASES = [
    dict(rule="static"),
    dict(rule="threshold", threshold=0.6),
    dict(rule="threshold_k", threshold=0.6, steps=2),
    dict(rule="entropy", entropy_bound=0.8),
    dict(rule="margin", threshold=0.3),
    dict(rule="threshold", threshold=0.6, block_size=8, sub_block_size=4),
]


@pytest.mark.parametrize("shifted", [False, True], ids=["sdar", "nbdiff"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_cached_decoding_equals_full_recompute(model, case, shifted):
    """At every step the cached forward must give the tokens a full recompute of the prefix and
    the block gives: the whole decode, step for step, is identical."""
    kw = {"block_size": 4, **case}
    prompt = prompts(3, 7)
    cached = block_decode(model, prompt, 13, shifted=shifted, record=True, **kw)
    full = block_decode(model, prompt, 13, shifted=shifted, use_cache=False, record=True, **kw)
    assert [s.tolist() for s in cached.sequences] == [s.tolist() for s in full.sequences]
    assert cached.forwards == full.forwards
    for mine, ref in zip(cached.trajectory, full.trajectory, strict=True):
        assert [t[:3] for t in mine] == [t[:3] for t in ref]  # step, position, token
        got, want = torch.tensor([t[3:] for t in mine]), torch.tensor([t[3:] for t in ref])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # log-prob, entropy
    for r, seq in enumerate(cached.sequences):
        assert seq.shape == (20,) and (seq != model.mask_token_id).all()
        assert torch.equal(seq[:7], prompt[r])


def test_prompt_is_kept_and_every_position_is_decoded_once(model):
    prompt = prompts(2, 6)
    out = block_decode(
        model, prompt, 10, block_size=4, rule="threshold", threshold=0.5, record=True
    )
    for r, seq in enumerate(out.sequences):
        assert torch.equal(seq[:6], prompt[r])
        positions = [t.position for t in out.trajectory[r]]
        assert sorted(positions) == list(range(6, 16))  # the prompt tail opens block 1
        assert all(seq[t.position] == t.token for t in out.trajectory[r])
        steps = [t.step for t in out.trajectory[r]]
        assert steps == sorted(steps) and all(
            t.logprob <= 0 and t.entropy >= 0 for t in out.trajectory[r]
        )


def test_fused_commit_matches_unfused_with_fewer_forwards(model):
    prompt = prompts(1, 8)  # two full prompt blocks
    kw = dict(block_size=4, rule="static")
    fused = block_decode(model, prompt, 16, fuse=True, **kw)
    plain = block_decode(model, prompt, 16, fuse=False, **kw)
    assert torch.equal(fused.sequences[0], plain.sequences[0])
    # static B=S=4: 4 peeks per block; unfused adds the prefill and a commit per later block
    assert fused.forwards == 4 * 4 and plain.forwards == 1 + 4 * 4 + 3
    assert fused.tokens_per_forward == 1.0 and plain.tokens_per_forward == 16 / 20


def test_shifted_block_size_one_is_ar_decoding(model):
    prompt = prompts(2, 5)
    nb = block_decode(model, prompt, 9, block_size=1, shifted=True)
    ar = ar_decode(model, prompt, 9)
    assert [s.tolist() for s in nb.sequences] == [s.tolist() for s in ar.sequences]
    assert nb.forwards == ar.forwards == 9


def test_ar_decode_cache_equals_recompute_and_greedy_argmax(model):
    prompt = prompts(2, 5)
    out = ar_decode(model, prompt, 8)
    assert out.forwards == 8 and out.tokens_per_forward == 1.0
    full = ar_decode(model, prompt, 8, use_cache=False)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in full.sequences]
    x = prompt.clone()
    for _ in range(8):
        logits = model(x, layout="causal")[:, -1]
        logits[:, model.mask_token_id] = -float("inf")
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.stack(out.sequences), x)


def test_eos_stops_rows_and_drops_them(model):
    prompt = prompts(3, 4)
    free = block_decode(model, prompt, 16, block_size=4, rule="threshold", threshold=0.5)
    eos = int(free.sequences[0][6])  # a token row 0 generates in its first block
    out = block_decode(model, prompt, 16, block_size=4, rule="threshold", threshold=0.5, eos_id=eos)
    for r, seq in enumerate(out.sequences):
        hits = (free.sequences[r][4:] == eos).nonzero()
        if len(hits):
            assert seq.tolist() == free.sequences[r][: 4 + int(hits[0]) + 1].tolist()
        else:
            assert torch.equal(seq, free.sequences[r])
    assert out.num_generated[0] <= 4 and out.row_forwards[0] < free.row_forwards[0]
    ar = ar_decode(model, prompt, 16, eos_id=eos)
    assert all(s[-1] == eos or len(s) == 20 for s in ar.sequences)


def test_batch_rows_progress_independently(model):
    """A batch decodes each row exactly as it would alone (rows share only the commit)."""
    prompt = prompts(3, 6, seed=3)
    kw = dict(block_size=4, rule="threshold", threshold=0.7)
    batch = block_decode(model, prompt, 12, **kw)
    for r in range(3):
        alone = block_decode(model, prompt[r : r + 1], 12, **kw)
        assert torch.equal(batch.sequences[r], alone.sequences[0])
        assert batch.row_forwards[r] == alone.row_forwards[0]


def test_temperature_sampling_is_reproducible_and_top_k_one_is_greedy(model):
    prompt = prompts(2, 4)
    kw = dict(block_size=4, rule="sequential")  # the order does not depend on p̂

    def run(**s):
        return block_decode(model, prompt, 8, generator=torch.Generator().manual_seed(1), **kw, **s)

    a, b = run(temperature=1.0), run(temperature=1.0)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    greedy = block_decode(model, prompt, 8, **kw)
    one = run(temperature=0.7, top_k=1)
    assert [s.tolist() for s in one.sequences] == [s.tolist() for s in greedy.sequences]


def test_bad_arguments_raise(model):
    prompt = prompts(1, 4)
    with pytest.raises(ValueError, match="rule"):
        block_decode(model, prompt, 4, rule="random")
    with pytest.raises(ValueError, match="sub_block_size"):
        block_decode(model, prompt, 4, block_size=4, sub_block_size=3)
    with pytest.raises(ValueError, match="fuse"):
        block_decode(model, prompt, 4, shifted=True, fuse=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ar_decode(model, prompt, 0)
    with pytest.raises(ValueError, match="prompt"):
        block_decode(model, prompt.float(), 4)
    with pytest.raises(ValueError, match="top_p"):
        ar_decode(model, prompt, 4, top_p=0.0)
