"""Training: denoising objectives and a generic trainer (EMA, warm-up + cosine LR, clipping,
bf16, DDP/FSDP2 under torchrun) with atomic checkpoints and exact resume; the AR and
AR -> block-diffusion recipes (SDAR, NBDiff) for :class:`~adaptdiff.models.BlockDiffusionLM`;
TraceRL over block-decoding trajectories (:mod:`.tracerl`), block pruning with distillation
(:mod:`.prune`) and MotionDirector's dual-path LoRA training (:mod:`.motion_director`)."""

from . import motion_director, prune, tracerl
from .block_diffusion import (
    BlockLMLoss,
    ar_loss,
    chunked_cross_entropy,
    corrupt,
    curriculum_block_size,
    nbdiff_loss,
    sample_mask_times,
    sdar_loss,
    text_dataset,
)
from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .ema import EMA, update_ema
from .objectives import DiffusionObjective
from .trainer import BatchStream, TrainConfig, Trainer, warmup_cosine

__all__ = [
    "EMA",
    "BatchStream",
    "BlockLMLoss",
    "CheckpointError",
    "DiffusionObjective",
    "TrainConfig",
    "Trainer",
    "ar_loss",
    "chunked_cross_entropy",
    "corrupt",
    "curriculum_block_size",
    "load_checkpoint",
    "load_weights",
    "motion_director",
    "nbdiff_loss",
    "prune",
    "sample_mask_times",
    "save_checkpoint",
    "sdar_loss",
    "text_dataset",
    "tracerl",
    "update_ema",
    "warmup_cosine",
]
