import math

import pytest
import torch

import adaptdiff.metrics.digits as digits_metrics
from adaptdiff.data import digits
from adaptdiff.metrics import ClassifierConfig, DigitsEvaluator, frechet_distance
from adaptdiff.metrics.digits import cache_path, gaussian_stats, load_classifier

# a classifier that trains in well under a second: for the cache mechanics only
TINY = ClassifierConfig(channels=(4, 8), features=16, epochs=1, batch_size=256)


def test_frechet_distance_closed_form():
    # diagonal covariances: |m1 - m2|² + Σ (√a - √b)²; a shared rotation changes nothing
    m1 = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    m2 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    a = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert math.isclose(frechet_distance(m1, a.diag(), m2, b.diag()), expected, rel_tol=1e-12)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    rotated = frechet_distance(q @ m1, q @ a.diag() @ q.T, q @ m2, q @ b.diag() @ q.T)
    assert math.isclose(rotated, expected, rel_tol=1e-9)


def test_frechet_distance_of_a_sample_with_itself_is_zero():
    x = torch.randn(50, 8) @ torch.randn(8, 8)
    mean, cov = gaussian_stats(x)
    assert frechet_distance(mean, cov, mean, cov) < 1e-9 * float(cov.trace())
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(mean, cov, mean[:4], cov[:4, :4])
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])


def test_cache_path_follows_env_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTDIFF_CACHE_DIR", str(tmp_path))
    path = cache_path(TINY)
    assert path.parent == tmp_path
    assert "16px" in path.name and TINY.key() in path.name
    assert cache_path(ClassifierConfig(size=32, **_tiny_without_size())).name != path.name
    assert cache_path(ClassifierConfig(channels=(4, 8), features=16, epochs=2)).name != path.name
    monkeypatch.delenv("ADAPTDIFF_CACHE_DIR")
    assert cache_path(TINY).parent.name == "adaptdiff"


def _tiny_without_size():
    return {"channels": TINY.channels, "features": TINY.features, "epochs": TINY.epochs}


def test_cache_is_reused_without_retraining(tmp_path, monkeypatch):
    first = DigitsEvaluator(16, cache_dir=tmp_path, config=TINY)
    assert first.trained and cache_path(TINY, tmp_path).is_file()
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file

    def no_training(config):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(digits_metrics, "train_classifier", no_training)
    second = DigitsEvaluator(16, cache_dir=tmp_path, config=TINY)
    assert not second.trained
    for p, q in zip(first.classifier.parameters(), second.classifier.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "empty"])
def test_corrupted_cache_is_detected_and_retrained(tmp_path, damage):
    original = DigitsEvaluator(16, cache_dir=tmp_path, config=TINY)
    path = cache_path(TINY, tmp_path)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_byte":
        blob[-100] ^= 0x01  # inside the tensor data: only the checksum notices
    elif damage == "garbage":
        blob = bytearray(b"not a checkpoint")
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))

    with pytest.warns(UserWarning, match="corrupted"):
        again = DigitsEvaluator(16, cache_dir=tmp_path, config=TINY)
    assert again.trained
    # retraining is deterministic and rewrote a valid file
    restored = load_classifier(TINY, path)
    for p, q, r in zip(
        original.classifier.parameters(),
        again.classifier.parameters(),
        restored.parameters(),
        strict=True,
    ):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_cache_of_another_config_is_not_used(tmp_path):
    other = ClassifierConfig(channels=(4, 8), features=16, epochs=1, batch_size=256, seed=1)
    DigitsEvaluator(16, cache_dir=tmp_path, config=other)
    cache_path(other, tmp_path).replace(cache_path(TINY, tmp_path))
    with pytest.warns(UserWarning, match="config mismatch"):
        assert DigitsEvaluator(16, cache_dir=tmp_path, config=TINY).trained


def test_evaluator_checks_its_inputs(tmp_path):
    with torch.inference_mode():  # training at first use still works here
        evaluator = DigitsEvaluator(16, cache_dir=tmp_path, config=TINY)
    assert evaluator.trained
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        evaluator.fd(torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        evaluator.accuracy(torch.zeros(4, 1, 16, 16), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="config.size"):
        DigitsEvaluator(32, cache_dir=tmp_path, config=TINY)


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    return DigitsEvaluator(16, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_classifier_accuracy_on_real_digits(evaluator):
    assert evaluator.test_accuracy > 0.95
    images, labels = digits(16, "test")
    assert evaluator.accuracy(images, labels) == evaluator.test_accuracy
    assert evaluator.accuracy(images, (labels + 1) % 10) < 0.05  # wrong conditioning is caught


@pytest.mark.slow
def test_accuracy_of_noise_is_chance(evaluator):
    noise = torch.randn(1000, 1, 16, 16)
    labels = torch.arange(1000) % 10
    assert abs(evaluator.accuracy(noise, labels) - 0.1) < 0.05


@pytest.mark.slow
def test_digits_fd_orders_real_and_noise(evaluator):
    test_images, _ = digits(16, "test")
    train_images, _ = digits(16, "train")
    noise = torch.rand(300, 1, 16, 16) * 2 - 1
    scale = float(evaluator.ref_cov.trace())
    assert evaluator.fd(test_images) < 1e-6 * scale
    fd_train = evaluator.fd(train_images[:300])
    fd_noise = evaluator.fd(noise)
    assert 0 < fd_train and fd_noise > 20 * fd_train
    blurred = torch.nn.functional.avg_pool2d(train_images[:300], 3, 1, 1)
    assert fd_train < evaluator.fd(blurred) < fd_noise
