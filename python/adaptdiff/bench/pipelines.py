"""Random-weight diffusers pipelines of every family that ``adaptdiff.accel`` drives, built from
their components in code (nothing is downloaded): :func:`build_pipeline`.

Each pipeline is the real diffusers class (``DiTPipeline``, ``PixArtSigmaPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``, ``SanaPipeline``) with a small transformer, a
small VAE and the family's scheduler. The text encoders are left out: the call keyword arguments
carry random ``prompt_embeds`` (and their negatives and masks), so ``pipe(**call_kwargs)`` runs
the pipeline's own ``__call__``, denoising loop, guidance and scheduler. Sizes: ``"tiny"`` (tests
and docs: a few thousand parameters, 8x8 latents), ``"small"`` (the CPU benchmark: wider and
deeper transformers, 16x16 latents, more steps), ``"medium"`` (the CPU benchmark of RAS at 1024
image tokens: the small width, 6 layers, 64x64 latents, 32x32 on Sana whose patch is 1) and
``"large"`` (the GPU check: width 768, 8 layers, 64x64 latents, i.e. 1024 image tokens on the
patch-2 families and Flux, 4096 on Sana).
"""

from __future__ import annotations

import torch

__all__ = ["FAMILIES", "SIZES", "build_pipeline"]

FAMILIES = ("dit", "pixart", "sd3", "flux", "sana")
# width (heads x head dim), depth, latent side, steps
SIZES = {
    "tiny": {"heads": 2, "head_dim": 8, "layers": 3, "latent": 8, "steps": 6},
    "small": {"heads": 4, "head_dim": 32, "layers": 8, "latent": 16, "steps": 20},
    # RAS's CPU target: 1024 image tokens at width 128 (Sana, patch 1: 32x32 latents)
    "medium": {
        "heads": 4,
        "head_dim": 32,
        "layers": 6,
        "latent": 64,
        "steps": 20,
        "sana_latent": 32,
    },
    # the GPU check: width 768, 1024 image tokens (DiT, PixArt, SD3, Flux), 4096 on Sana
    "large": {"heads": 12, "head_dim": 64, "layers": 8, "latent": 64, "steps": 28},
}


def _perturb(module: torch.nn.Module, std: float) -> None:
    """Add noise to every parameter: zero-initialised gates (adaLN-Zero) would make blocks
    identities and the outputs trivial."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _vae_kl(latent_channels: int, **extra):
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16, **extra,
    )  # fmt: skip


def _text(generator, batch: int, tokens: int, dim: int) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=generator)


def _dit(s: dict, batch: int, g: torch.Generator):
    import diffusers

    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=4,
        out_channels=8, num_layers=s["layers"], sample_size=s["latent"], patch_size=2,
        num_embeds_ada_norm=1000, norm_num_groups=1,
    )  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False
    )
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=_vae_kl(4), scheduler=scheduler)
    labels = torch.randint(0, 1000, (batch,), generator=g).tolist()
    return pipe, {"class_labels": labels, "guidance_scale": 4.0}


def _pixart(s: dict, batch: int, g: torch.Generator):
    import diffusers

    text_dim = 16
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=s["heads"], attention_head_dim=s["head_dim"], in_channels=4,
        out_channels=8, num_layers=s["layers"], cross_attention_dim=s["heads"] * s["head_dim"],
        sample_size=s["latent"], patch_size=2, caption_channels=text_dim, norm_num_groups=1,
        use_additional_conditions=False,
    )  # fmt: skip
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    pipe = diffusers.PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=_vae_kl(4), transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip
    tokens = 6
    mask = torch.ones(batch, tokens, dtype=torch.long)
    kwargs = {
        "prompt_embeds": _text(g, batch, tokens, text_dim), "prompt_attention_mask": mask,
        "negative_prompt_embeds": _text(g, batch, tokens, text_dim),
        "negative_prompt_attention_mask": mask.clone(), "guidance_scale": 4.5,
        "negative_prompt": None, "use_resolution_binning": False,
    }  # fmt: skip
    return pipe, kwargs


def _sd3(s: dict, batch: int, g: torch.Generator):
    import diffusers

    text_dim, pooled_dim = 16, 8
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=s["latent"], patch_size=2, in_channels=4, num_layers=s["layers"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"],
        joint_attention_dim=text_dim, caption_projection_dim=s["heads"] * s["head_dim"],
        pooled_projection_dim=pooled_dim, out_channels=4, pos_embed_max_size=2 * s["latent"],
    )  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = _vae_kl(4, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    kwargs = {
        "prompt_embeds": _text(g, batch, 6, text_dim),
        "pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g),
        "negative_prompt_embeds": _text(g, batch, 6, text_dim),
        "negative_pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g),
        "guidance_scale": 5.0,
    }
    return pipe, kwargs


def _flux(s: dict, batch: int, g: torch.Generator):
    import diffusers

    text_dim, pooled_dim = 16, 8
    head_dim = s["head_dim"]
    rope = (head_dim // 4, head_dim // 4, head_dim // 2)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=max(1, s["layers"] // 3),
        num_single_layers=s["layers"] - max(1, s["layers"] // 3), attention_head_dim=head_dim,
        num_attention_heads=s["heads"], joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, axes_dims_rope=rope,
    )  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = _vae_kl(4, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=transformer,
    )  # fmt: skip
    kwargs = {
        "prompt_embeds": _text(g, batch, 6, text_dim),
        "pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g),
        "negative_prompt_embeds": _text(g, batch, 6, text_dim),
        "negative_pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g),
        "true_cfg_scale": 4.0,
    }
    return pipe, kwargs


def _sana(s: dict, batch: int, g: torch.Generator):
    import diffusers

    text_dim = 16
    width = s["heads"] * s["head_dim"]
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=s["heads"],
        attention_head_dim=s["head_dim"], num_layers=s["layers"], num_cross_attention_heads=2,
        cross_attention_head_dim=width // 2, cross_attention_dim=width, caption_channels=text_dim,
        sample_size=s["latent"], patch_size=1,
    )  # fmt: skip
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
        decoder_norm_types="rms_norm", decoder_act_fns="silu",
    )  # fmt: skip
    pipe = diffusers.SanaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )
    tokens = 6
    mask = torch.ones(batch, tokens, dtype=torch.long)
    kwargs = {
        "prompt_embeds": _text(g, batch, tokens, text_dim), "prompt_attention_mask": mask,
        "negative_prompt_embeds": _text(g, batch, tokens, text_dim),
        "negative_prompt_attention_mask": mask.clone(), "guidance_scale": 4.5,
        "negative_prompt": None, "use_resolution_binning": False, "complex_human_instruction": None,
    }  # fmt: skip
    return pipe, kwargs


_BUILDERS = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "sana": _sana}


def build_pipeline(family: str, size: str = "tiny", seed: int = 0, batch: int = 1):
    """A random-weight diffusers pipeline of ``family`` and the keyword arguments of one call.

    Returns ``(pipe, call_kwargs)``: ``pipe(**call_kwargs, generator=...)`` runs a whole
    generation (``num_inference_steps``, the output type, latents except DiT's, and the
    family's guidance are in ``call_kwargs``; override any of them; pass a freshly seeded
    ``generator`` per call). ``family``: one of :data:`FAMILIES`; ``size``: a key of
    :data:`SIZES`; ``seed`` draws the weights and the prompt embeddings; ``batch``: prompts
    (class labels for DiT) per call.
    """
    if family not in _BUILDERS:
        raise ValueError(f"build_pipeline: family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"build_pipeline: size must be one of {tuple(SIZES)}, got {size!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"build_pipeline: batch must be an int >= 1, got {batch!r}")
    s = dict(SIZES[size])
    s["latent"] = s.get(f"{family}_latent", s["latent"])
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    pipe, kwargs = _BUILDERS[family](s, batch, g)
    _perturb(pipe.transformer, 0.05)
    pipe.transformer.eval()
    pipe.vae.eval()
    pipe.set_progress_bar_config(disable=True)
    if family != "dit":
        side = s["latent"] * pipe.vae_scale_factor
        kwargs.update(height=side, width=side)
    kwargs.update(num_inference_steps=s["steps"], output_type="latent" if family != "dit" else "pt")
    return pipe, kwargs
