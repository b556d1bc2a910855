"""Diffusion models: :class:`DiT` with named configs (:data:`DIT_CONFIGS`, :func:`create_dit`),
its mixture-of-experts variants (DiT-MoE, MoDE) and their helpers; :class:`BlockDiffusionLM`
(:data:`BLOCK_LM_CONFIGS`, :func:`create_block_lm`), an AR / block-diffusion language model,
saved and loaded by :func:`save_block_lm` / :func:`load_block_lm`, converted from a Hugging Face
Llama / Qwen2 / Qwen3 causal LM by :func:`block_lm_from_hf` (and back by
:func:`block_lm_to_hf`); :func:`load_dit` / :func:`save_dit`
for the original DiT and diffusers checkpoint layouts; :class:`DiMSUM`
(:data:`DIMSUM_CONFIGS`, :func:`create_dimsum`), a Mamba backbone with wavelet scans, called
like DiT; :class:`VideoDiT` (factorised space/time attention), :class:`VisionBlockLM` (an image
encoder prefixing a block-diffusion LM) and :class:`DiffusionPolicyTransformer` (action chunks,
dense or MoDE); :class:`DiffuSIA`, encoder–decoder text diffusion in embedding space;
:class:`SpatioTemporalDiT` (:data:`SPATIOTEMPORAL_CONFIGS`, :func:`create_spatiotemporal_dit`),
a flow-matching DiT for multivariate time series (UniTS); :func:`create_vae`, a small diffusers
``AutoencoderKL`` for latent diffusion (:mod:`.vae`)."""

from .block_lm import (
    BLOCK_LM_CONFIGS,
    BlockDiffusionLM,
    BlockLMConfig,
    KVCache,
    create_block_lm,
)
from .block_lm_io import load_block_lm, save_block_lm
from .checkpoints import DiffusersTimestepEmbedder, DiTCheckpointError, load_dit, save_dit
from .dfm import DFM_CONFIGS, DFMConfig, DFMDiT, create_dfm
from .diffusia import DiffuSIA, DiffuSIAConfig, create_diffusia
from .dimsum import DIMSUM_CONFIGS, DiMSUM, DiMSUMConfig, create_dimsum
from .dit import (
    DIT_CONFIGS,
    DiT,
    DiTBlock,
    DiTConfig,
    FinalLayer,
    create_dit,
    dtr_masks,
    get_2d_sincos_pos_embed,
    perturb_condition,
)
from .dit_moe import expert_load, moe_aux_loss, moe_layers, upcycle_to_moe
from .edge_diffusion import EdgeDiffusion, EdgeDiffusionConfig, EdgeDiscriminative
from .hf_lm import block_lm_from_hf, block_lm_to_hf
from .ita import ImageTimestepAdaptiveAggregator, salient_region
from .ita_mdt import ITAInpainter, ITAInpainterConfig
from .layers import Attention, Mlp, TimestepEmbedder, modulate, timestep_embedding
from .mdt import MDT, MDT_CONFIGS, MDTConfig, create_mdt
from .mode import FusedExperts, NoiseRoutedMoE, precompute_experts
from .policy import DiffusionPolicyTransformer, PolicyConfig
from .sr_dit import (
    SRDiT,
    SRDiTConfig,
    calibrate_heads,
    calibration_report,
    random_heads,
    route_heads,
)
from .text_encoder import TextDiT, TextEncoder, TextEncoderConfig, WordTokenizer
from .units import (
    SPATIOTEMPORAL_CONFIGS,
    SpatioTemporalConfig,
    SpatioTemporalDiT,
    create_spatiotemporal_dit,
)
from .vae import VAE_CONFIGS, VAEConfig, create_vae
from .video_dit import VIDEO_DIT_CONFIGS, VideoDiT, VideoDiTConfig, create_video_dit
from .vl import VisionBlockLM

__all__ = [
    "EdgeDiffusion",
    "EdgeDiffusionConfig",
    "EdgeDiscriminative",
    "BLOCK_LM_CONFIGS",
    "DFM_CONFIGS",
    "DIMSUM_CONFIGS",
    "DIT_CONFIGS",
    "MDT_CONFIGS",
    "SPATIOTEMPORAL_CONFIGS",
    "VAE_CONFIGS",
    "VIDEO_DIT_CONFIGS",
    "Attention",
    "TextDiT",
    "TextEncoder",
    "TextEncoderConfig",
    "WordTokenizer",
    "BlockDiffusionLM",
    "BlockLMConfig",
    "VAEConfig",
    "DFMConfig",
    "DFMDiT",
    "DiT",
    "DiMSUM",
    "DiffuSIA",
    "DiffuSIAConfig",
    "DiMSUMConfig",
    "DiTBlock",
    "DiTCheckpointError",
    "DiTConfig",
    "DiffusionPolicyTransformer",
    "DiffusersTimestepEmbedder",
    "FinalLayer",
    "FusedExperts",
    "ImageTimestepAdaptiveAggregator",
    "ITAInpainter",
    "ITAInpainterConfig",
    "KVCache",
    "MDT",
    "MDTConfig",
    "Mlp",
    "NoiseRoutedMoE",
    "PolicyConfig",
    "SRDiT",
    "SRDiTConfig",
    "SpatioTemporalConfig",
    "SpatioTemporalDiT",
    "TimestepEmbedder",
    "VideoDiT",
    "VideoDiTConfig",
    "VisionBlockLM",
    "block_lm_from_hf",
    "block_lm_to_hf",
    "calibrate_heads",
    "calibration_report",
    "create_block_lm",
    "create_dfm",
    "create_diffusia",
    "create_dimsum",
    "create_dit",
    "create_mdt",
    "create_spatiotemporal_dit",
    "create_vae",
    "create_video_dit",
    "dtr_masks",
    "expert_load",
    "get_2d_sincos_pos_embed",
    "load_block_lm",
    "load_dit",
    "modulate",
    "moe_aux_loss",
    "moe_layers",
    "perturb_condition",
    "precompute_experts",
    "random_heads",
    "route_heads",
    "save_block_lm",
    "salient_region",
    "save_dit",
    "timestep_embedding",
    "upcycle_to_moe",
]
