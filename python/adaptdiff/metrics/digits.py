"""Download-free sample-quality metrics for digits models: a small CNN trained on the real digits.

:class:`DigitsEvaluator` gives, for generated ``[N, 1, size, size]`` images in [-1, 1],

- ``accuracy(samples, labels)``: how often the classifier reads the class a conditional model
  was asked for (class-conditional accuracy; 0.1 is chance);
- ``fd(samples)``: "digits-FD", the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features of the samples and of the held-out real digits (the ``"test"`` split of
  :func:`adaptdiff.data.digits`, 300 images) — FID's recipe with a digits network. Like FID it is
  biased upwards for small sample counts: compare numbers computed from equally many samples.

The classifier trains on the ``"train"`` split on the CPU at first use (seeded, deterministic, a
few seconds) and is cached under ``$ADAPTDIFF_CACHE_DIR`` (default ``~/.cache/adaptdiff``) in a
file whose name carries the image size and a hash of the training config. The file holds a
SHA-256 of its payload and is written atomically; a file that fails the check or does not load is
reported with a warning and retrained, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from adaptdiff.data.digits import NUM_CLASSES, batches, digits

# v2: the payload is a safetensors file (no pickle) with the config in its metadata.
_MAGIC = b"adaptdiff-digits-classifier v2\n"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training recipe of the digits classifier (all of it goes into the cache
    file's hash; bump ``version`` when the training code changes)."""

    size: int = 16
    channels: tuple[int, int] = (16, 32)
    features: int = 64
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    shift: int = 1  # random translations of up to shift * (size // 16) pixels
    seed: int = 0
    version: int = 1

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class DigitsClassifier(nn.Module):
    """Two conv/ReLU/max-pool stages, a 4×4 adaptive average pool, a ``features``-wide ReLU
    layer (the penultimate features) and a linear head. Above 16 px the first conv strides by
    ``size // 16`` (kernel ``2 * stride``), so 32 px images cost what 16 px ones do while every
    pixel is still seen."""

    def __init__(self, size: int = 16, channels: tuple[int, int] = (16, 32), features: int = 64):
        super().__init__()
        c1, c2 = channels
        stride = max(1, size // 16)
        stem = (
            nn.Conv2d(1, c1, 3, padding=1)
            if stride == 1
            else nn.Conv2d(1, c1, 2 * stride, stride=stride, padding=stride // 2)
        )
        self.body = nn.Sequential(
            stem,
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(c2 * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1, H, W] -> [N, features]
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1, H, W] -> logits [N, 10]
        return self.head(self.body(x))


def cache_dir() -> Path:
    """``$ADAPTDIFF_CACHE_DIR``, or ``~/.cache/adaptdiff`` when it is unset or empty."""
    return Path(os.path.expanduser(os.environ.get("ADAPTDIFF_CACHE_DIR") or "~/.cache/adaptdiff"))


def cache_path(config: ClassifierConfig, directory: Path | str | None = None) -> Path:
    directory = cache_dir() if directory is None else Path(directory)
    # .v2: magic line, sha256, then a safetensors payload (v1 files, .pt, held a torch pickle).
    return directory / f"digits_classifier_{config.size}px_{config.key()}.v2"


def _random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in x and y, filling with background (-1)."""
    n, _, height, width = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(-pixels, pixels + 1, (2, n, 1), generator=generator) + pixels
    rows = (torch.arange(height) + dy)[:, :, None]  # [n, H, 1]
    cols = (torch.arange(width) + dx)[:, None, :]  # [n, 1, W]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_classifier(config: ClassifierConfig) -> DigitsClassifier:
    """Train on the ``"train"`` split, on the CPU, from ``config.seed``.

    Runs single-threaded (tiny convolutions gain nothing from threads, and the weights then do
    not depend on the machine's thread count) and leaves the global RNG and thread count as
    they were; works when called under ``no_grad`` or ``inference_mode``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: ClassifierConfig) -> DigitsClassifier:
    images, labels = digits(config.size, "train")
    pixels = config.shift * max(1, config.size // 16)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitsClassifier(config.size, config.channels, config.features)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    model.train()
    for _ in range(config.epochs):
        for x, y in batches(images, labels, batch_size=config.batch_size, generator=generator):
            if pixels:
                x = _random_shift(x, pixels, generator)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


class CorruptCacheError(RuntimeError):
    pass


def _write_atomic(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_classifier(model: DigitsClassifier, config: ClassifierConfig, path: Path) -> None:
    config_json = json.dumps(dataclasses.asdict(config), sort_keys=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = safetensors.torch.save(weights, metadata={"config": config_json})
    digest = hashlib.sha256(payload).hexdigest().encode()
    _write_atomic(path, _MAGIC + digest + b"\n" + payload)


def load_classifier(config: ClassifierConfig, path: Path) -> DigitsClassifier:
    """Load a cached classifier; raises :class:`CorruptCacheError` when the file is damaged or
    belongs to another config, ``FileNotFoundError`` when it is missing."""
    blob = path.read_bytes()
    head = len(_MAGIC)
    if not blob.startswith(_MAGIC) or blob[head + 64 : head + 65] != b"\n":
        raise CorruptCacheError("unknown header")
    payload = blob[head + 65 :]
    if hashlib.sha256(payload).hexdigest().encode() != blob[head : head + 64]:
        raise CorruptCacheError("checksum mismatch")
    try:
        header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
        saved_config = header["__metadata__"]["config"]
        if saved_config != json.dumps(dataclasses.asdict(config), sort_keys=True):
            raise CorruptCacheError(f"config mismatch: {saved_config}")
        model = DigitsClassifier(config.size, config.channels, config.features)
        model.load_state_dict(safetensors.torch.load(payload))
    except CorruptCacheError:
        raise
    except Exception as e:  # a payload that passed the checksum but does not load
        raise CorruptCacheError(f"{type(e).__name__}: {e}") from e
    return model.eval()


def get_classifier(
    config: ClassifierConfig, directory: Path | str | None = None
) -> tuple[DigitsClassifier, bool]:
    """The cached classifier for ``config``, trained (and cached) when missing or damaged.
    Returns ``(model, trained_now)``."""
    path = cache_path(config, directory)
    try:
        return load_classifier(config, path), False
    except FileNotFoundError:
        pass
    except CorruptCacheError as e:
        warnings.warn(
            f"digits classifier cache {path} is corrupted ({e}); retraining", stacklevel=2
        )
    model = train_classifier(config)
    try:
        save_classifier(model, config, path)
    except OSError as e:
        warnings.warn(f"could not write the digits classifier cache {path}: {e}", stacklevel=2)
    return model, True


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features [N, D]``, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(
            f"gaussian_stats: features must be [N >= 2, D], got {tuple(features.shape)}"
        )
    x = features.double()
    return x.mean(0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """``|m1 - m2|² + tr(C1 + C2 - 2 (C1 C2)^½)`` between two Gaussians, in float64.

    ``tr (C1 C2)^½`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``C1^½ C2 C1^½`` (same spectrum as ``C1 C2``), both from ``eigh``:
    exact for PSD inputs and free of the complex round-off of a general ``sqrtm``.
    """
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mean1),) * 2:
        raise ValueError(
            "frechet_distance: means must be [D] and covariances [D, D] alike, got "
            f"{tuple(mean1.shape)}, {tuple(cov1.shape)}, {tuple(mean2.shape)}, {tuple(cov2.shape)}"
        )
    values, vectors = torch.linalg.eigh(cov1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return max(float(distance), 0.0)  # >= 0 in exact arithmetic; round-off can dip below


class DigitsEvaluator:
    """Class-conditional accuracy and digits-FD of generated ``[N, 1, size, size]`` samples.

    Samples are clamped to [-1, 1] first, as saving them as an image would. ``test_accuracy``
    is the classifier's accuracy on the real held-out digits; ``trained`` says whether this
    evaluator trained the classifier (``False``: loaded from the cache).
    """

    def __init__(
        self,
        size: int = 16,
        *,
        device: torch.device | str | None = None,
        cache_dir: Path | str | None = None,
        config: ClassifierConfig | None = None,
    ):
        config = ClassifierConfig(size=size) if config is None else config
        if config.size != size:
            raise ValueError(
                f"DigitsEvaluator: config.size ({config.size}) must equal size ({size})"
            )
        self.size = size
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        model, self.trained = get_classifier(config, cache_dir)
        self.classifier = model.requires_grad_(False).to(self.device)
        real, real_labels = digits(size, "test")
        self.test_accuracy = self.accuracy(real, real_labels)
        self.ref_mean, self.ref_cov = gaussian_stats(self.features(real))

    def _check(self, name: str, samples: torch.Tensor) -> None:
        if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, self.size, self.size):
            raise ValueError(
                f"DigitsEvaluator.{name}: samples must be [N, 1, {self.size}, {self.size}], "
                f"got {tuple(samples.shape)}"
            )

    @torch.no_grad()
    def features(self, samples: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features ``[N, features]`` (float32, on the evaluator's device)."""
        self._check("features", samples)
        chunks = [
            self.classifier.features(x.to(self.device, torch.float32).clamp(-1, 1))
            for x in samples.split(batch_size)
        ]
        return torch.cat(chunks) if chunks else samples.new_zeros(0, self.config.features)

    @torch.no_grad()
    def logits(self, samples: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self._check("logits", samples)
        return torch.cat(
            [
                self.classifier(x.to(self.device, torch.float32).clamp(-1, 1))
                for x in samples.split(batch_size)
            ]
        )

    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of samples the classifier assigns to their ``labels [N]``."""
        self._check("accuracy", samples)
        if labels.shape != (samples.shape[0],):
            raise ValueError(
                f"DigitsEvaluator.accuracy: labels must be [{samples.shape[0]}], "
                f"got {tuple(labels.shape)}"
            )
        if samples.shape[0] == 0:
            raise ValueError("DigitsEvaluator.accuracy: samples must not be empty")
        predicted = self.logits(samples).argmax(1)
        return float((predicted == labels.to(predicted.device)).double().mean())

    def fd(self, samples: torch.Tensor) -> float:
        """digits-FD of ``samples`` (N >= 2) against the real held-out digits."""
        self._check("fd", samples)
        mean, cov = gaussian_stats(self.features(samples))
        return frechet_distance(mean, cov, self.ref_mean, self.ref_cov)
