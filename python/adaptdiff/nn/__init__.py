"""Reusable layers built on the adaptdiff ops; :mod:`adaptdiff.nn.functional` holds their
functional forms (like ``torch.nn.functional``)."""

from . import functional
from .expert_parallel import ExpertParallelMoE, moe_swiglu_ep
from .functional import MoEAux, moe_swiglu
from .moe import MoEFeedForward

__all__ = [
    "ExpertParallelMoE",
    "MoEAux",
    "MoEFeedForward",
    "functional",
    "moe_swiglu",
    "moe_swiglu_ep",
]
