"""The tiny seeded models the tests share: a DiT and a block-diffusion LM that run in
milliseconds on the CPU (``tests/conftest.py`` offers the builders as fixtures too)."""

import torch
from torch import nn

from adaptdiff.models import BlockDiffusionLM, DiT, create_block_lm, create_dit


def randomize_(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Redraws every parameter from N(0, std²): the zero-initialised adaLN and output layers
    too, so no block is the identity and no output is 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def perturb_(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Adds N(0, std²) noise to every parameter: wakes adaLN-Zero's gates while keeping the
    scale of the initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def tiny_dit(
    name: str = "DiT-tiny/2",
    *,
    seed: int | None = 0,
    perturb: float = 0.0,
    randomize: float = 0.0,
    train: bool = False,
    **overrides,
) -> DiT:
    """``create_dit(name, **overrides)`` built right after ``torch.manual_seed(seed)`` (``None``:
    from the caller's generator state), then :func:`perturb_` or :func:`randomize_` with the
    given std (0: the plain initialisation), in eval mode unless ``train``."""
    if perturb and randomize:
        raise ValueError("tiny_dit: pass perturb or randomize, not both")
    if seed is not None:
        torch.manual_seed(seed)
    model = create_dit(name, **overrides)
    if perturb:
        perturb_(model, perturb)
    if randomize:
        randomize_(model, randomize)
    return model.train(train)


def tiny_block_lm(
    vocab_size: int,
    *,
    seed: int = 0,
    sharpen: float = 1.0,
    train: bool = False,
    name: str = "BlockLM-tiny",
    **overrides,
) -> BlockDiffusionLM:
    """``create_block_lm(name, vocab_size=...)`` built after ``torch.manual_seed(seed)``, every
    matrix scaled by ``sharpen`` (peaked logits instead of the 0.02 init's near-uniform ones,
    so that comparisons and ties mean something), in eval mode unless ``train``."""
    torch.manual_seed(seed)
    model = create_block_lm(name, vocab_size=vocab_size, **overrides)
    if sharpen != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(sharpen)
    return model.train(train)
