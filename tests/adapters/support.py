import torch

from adaptdiff.models import create_dit
from tests.support.models import tiny_dit


def noisy_dit(name="DiT-tiny/2", seed=3):
    """A DiT whose adaLN-Zero gates are not zero (so every block does something)."""
    return tiny_dit(name, seed=seed, perturb=0.05)


def plain_copy(model, name="DiT-tiny/2"):
    """A plain DiT with ``model``'s base weights (adapter tensors dropped)."""
    fresh = create_dit(name).eval()
    fresh.load_state_dict(base_state(model))
    return fresh


def base_state(model):
    keep = {}
    for k, v in model.state_dict().items():
        if any(s in k for s in ("lora_", ".up", ".down", ".columns", "gamma", "fera_router")):
            continue
        keep[k.replace(".base.", ".")] = v
    return keep


def inputs(b=3, size=8, channels=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, channels, size, size, generator=g)
    return x, torch.rand(b, generator=g) * 999, torch.arange(b) % 10


def randomise(params, std=0.2):
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)
