"""Training: denoising objectives and a generic trainer (EMA, warm-up + cosine LR, clipping,
bf16, DDP/FSDP2 under torchrun) with atomic checkpoints and exact resume."""

from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .ema import EMA, update_ema
from .objectives import DiffusionObjective
from .trainer import BatchStream, TrainConfig, Trainer, warmup_cosine

__all__ = [
    "EMA",
    "BatchStream",
    "CheckpointError",
    "DiffusionObjective",
    "TrainConfig",
    "Trainer",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "update_ema",
    "warmup_cosine",
]
