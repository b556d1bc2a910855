"""Training: denoising objectives and a generic trainer (EMA, warm-up + cosine LR, clipping,
bf16, DDP/FSDP2 under torchrun) with atomic checkpoints and exact resume; the AR and
AR -> block-diffusion recipes (SDAR, NBDiff) for :class:`~adaptdiff.models.BlockDiffusionLM`;
TraceRL over block-decoding trajectories (:mod:`.tracerl`), block pruning with distillation
(:mod:`.prune`), MotionDirector's dual-path LoRA training (:mod:`.motion_director`) and the
KL autoencoder of latent diffusion (:mod:`.vae`)."""

from . import motion_director, prune, tracerl, vae
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
from .dfm import DFMObjective, fit_stage_scale
from .ema import EMA, update_ema
from .mdt import MDTObjective
from .objectives import DiffusionObjective
from .trainer import BatchStream, TrainConfig, Trainer, warmup_cosine

__all__ = [
    "EMA",
    "BatchStream",
    "BlockLMLoss",
    "CheckpointError",
    "DFMObjective",
    "DiffusionObjective",
    "MDTObjective",
    "TrainConfig",
    "Trainer",
    "ar_loss",
    "chunked_cross_entropy",
    "corrupt",
    "curriculum_block_size",
    "fit_stage_scale",
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
    "vae",
    "warmup_cosine",
]
