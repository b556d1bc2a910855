import pytest
import torch
import torch.nn.functional as F

from adaptdiff.data.text import CharTokenizer, pydoc_corpus
from adaptdiff.train import (
    BlockLMLoss,
    TrainConfig,
    Trainer,
    ar_loss,
    chunked_cross_entropy,
    corrupt,
    curriculum_block_size,
    nbdiff_loss,
    sample_mask_times,
    sdar_loss,
    text_dataset,
)
from tests.support.models import tiny_block_lm

V = 19


def tiny(seed=0, vocab=V):
    return tiny_block_lm(vocab, seed=seed, train=True)


def batch(b=3, n=16, seed=0):
    return torch.randint(0, V - 1, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_cross_entropy_equals_full(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (11,), generator=g)
    got = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    want = F.cross_entropy(h @ w.T, t, reduction="none")
    torch.testing.assert_close(got, want)
    gh, gw = torch.autograd.grad((got * torch.arange(11.0)).sum(), (h, w))
    eh, ew = torch.autograd.grad((want * torch.arange(11.0)).sum(), (h, w))
    torch.testing.assert_close(gh, eh)
    torch.testing.assert_close(gw, ew)
    assert chunked_cross_entropy(h[:0], w, t[:0]).shape == (0,)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(h, w, t, chunk_size=0)


def test_mask_times_per_sample_per_block_and_antithetic():
    g = torch.Generator().manual_seed(0)
    t = sample_mask_times(4, 3, generator=g)
    assert t.shape == (4, 3) and (t[:, :1] == t).all() and ((t >= 1e-3) & (t <= 1)).all()
    t = sample_mask_times(4, 3, per="block", generator=g)
    assert not (t[:, :1] == t).all()
    t = sample_mask_times(5, 4, per="block", antithetic=True, eps=0.0, generator=g)
    strata = (t.flatten() * 20).floor().sort().values  # one draw in each of the 20 strata
    assert strata.tolist() == list(range(20))
    with pytest.raises(ValueError, match="per"):
        sample_mask_times(2, 2, per="token")


def test_corrupt_never_masks_the_prompt_and_masks_at_least_one():
    ids = batch(6, 10)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :4] = False
    noisy, masked = corrupt(ids, torch.full(ids.shape, 1e-3), V - 1, maskable)
    assert (masked.sum(1) >= 1).all() and not masked[:, :4].any()
    assert (noisy[masked] == V - 1).all() and torch.equal(noisy[~masked], ids[~masked])
    noisy, masked = corrupt(ids, torch.ones(ids.shape), V - 1, maskable)
    assert torch.equal(masked, maskable)


def test_losses_are_finite_and_backpropagate():
    model = tiny()
    x = batch()
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[:, :5] = True
    for loss in (
        ar_loss(model, x),
        sdar_loss(model, x, block_size=4),
        sdar_loss(model, (x, prompt), block_size=4, t_per="block", antithetic=True),
        nbdiff_loss(model, (x, prompt), block_size=4, normalize="answer"),
    ):
        assert loss.ndim == 0 and torch.isfinite(loss)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="block_size"):
        sdar_loss(model, x, block_size=5)
    with pytest.raises(ValueError, match="normalize"):
        sdar_loss(model, x, block_size=4, normalize="mean")


def test_prompt_tokens_are_never_targets_of_sdar():
    """Changing the logits' targets at prompt positions cannot change the loss: compare the
    loss with the whole sequence as prompt but one answer token (only that one is scored)."""
    model = tiny()
    x = batch(2, 8)
    prompt = torch.ones_like(x, dtype=torch.bool)
    prompt[:, -1] = False  # one answer token, always masked (at least one per row)
    loss = sdar_loss(model, (x, prompt), block_size=4, generator=torch.Generator().manual_seed(0))
    t = sample_mask_times(2, 2, generator=torch.Generator().manual_seed(0))[:, 1]
    noisy = x.clone()
    noisy[:, -1] = model.mask_token_id
    hidden = model(torch.cat([noisy, x], 1), layout="bd3", block_size=4)
    ce = F.cross_entropy(hidden[:, 7], x[:, 7], reduction="none")
    torch.testing.assert_close(loss, (ce / t).sum() / 2)


def test_normalisations_relate_as_documented():
    model = tiny()
    x = batch(2, 8)

    def loss(mode, b=x):
        return sdar_loss(
            model, b, block_size=4, normalize=mode, generator=torch.Generator().manual_seed(3)
        )

    # without prompts every token is an answer token: tokens == sequence == answer (equal lengths)
    torch.testing.assert_close(loss("tokens"), loss("sequence"))
    torch.testing.assert_close(loss("tokens"), loss("answer"))
    prompt = torch.zeros_like(x, dtype=torch.bool)
    prompt[0, :6] = True  # row 0 has 2 answer tokens, row 1 has 8
    assert not torch.allclose(loss("tokens", (x, prompt)), loss("answer", (x, prompt)))


def test_nbdiff_with_block_one_is_the_ar_loss_and_curriculum():
    model = tiny()
    x = batch()
    torch.testing.assert_close(nbdiff_loss(model, x, block_size=1), ar_loss(model, x))
    torch.testing.assert_close(
        nbdiff_loss(model, x, block_size=1, ar_weight=0.5), 0.5 * ar_loss(model, x)
    )
    sizes = [curriculum_block_size(s, 100) for s in range(100)]
    assert sizes[0] == 1 and sizes[-1] == 8 and sizes == sorted(sizes)
    assert [sizes.count(b) for b in (1, 2, 4, 8)] == [25, 25, 25, 25]
    loss = BlockLMLoss("nbdiff", curriculum=(1, 2, 4), total_steps=30)
    assert loss.current_block_size() == 1
    with pytest.raises(ValueError, match="total_steps"):
        BlockLMLoss("sdar", curriculum=(1, 2))
    with pytest.raises(ValueError, match="recipe"):
        BlockLMLoss("mdlm")


def _eval(model, loss_fn, data, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(sum(loss_fn(model, data[i : i + 32]) for i in range(0, 96, 32)) / 3)


@pytest.mark.parametrize("recipe", ["ar", "sdar", "nbdiff"])
def test_recipes_reduce_their_loss_on_the_corpus(recipe):
    tok = CharTokenizer()
    text = pydoc_corpus("train")[:40_000]
    data = text_dataset(tok.encode(text), 32, stride=16)
    model = tiny(vocab=tok.vocab_size)
    kwargs = {} if recipe == "ar" else dict(block_size=4)
    if recipe == "nbdiff":
        kwargs = dict(curriculum=(2, 4), total_steps=40)
    loss_fn = BlockLMLoss(recipe, **kwargs)
    eval_fn = BlockLMLoss(recipe, block_size=4) if recipe == "nbdiff" else loss_fn
    before = _eval(model, eval_fn, data)
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, ema_decay=None, log_every=0, progress=False)
    trainer = Trainer(model, loss_fn, data, cfg, device="cpu")
    loss_fn.trainer = trainer
    trainer.fit()
    assert loss_fn.current_block_size() == 4 or recipe != "nbdiff"
    after = _eval(model, eval_fn, data)
    assert after < before - 0.3, (before, after)


def test_text_dataset_windows():
    d = text_dataset(torch.arange(10), 4, stride=3)
    assert d.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="text_dataset"):
        text_dataset(torch.arange(3), 4)
