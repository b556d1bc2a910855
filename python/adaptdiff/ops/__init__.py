"""The adaptdiff ops: typed wrappers over ``torch.ops.adaptdiff.*``.

Each wrapper takes ``impl="auto" | "kernel" | "reference"``; ``torch.ops.adaptdiff.<op>``
is the same op without the choice. Importing this package registers the fake kernels
and autograd formulas. CUDA kernels not yet verified on a GPU (``UNVERIFIED_CUDA``) run only
after :func:`unverified_cuda`; until then their wrappers run the reference on CUDA.
:mod:`adaptdiff.ops.reference` holds the pure-torch references.
"""

from . import reference
from ._common import UNVERIFIED_CUDA, Impl, unverified_cuda
from .block_attention import block_attention
from .cosine import cosine
from .gather_tokens import gather_tokens
from .indexed_linear_ import indexed_linear_
from .lincomb import lincomb
from .moe_permute import moe_permute
from .moe_unpermute import moe_unpermute
from .patch_scores import patch_scores
from .rel_l1 import rel_l1
from .sampled_wgrad import sampled_wgrad
from .sara_linear import sara_linear
from .scatter_tokens import scatter_tokens
from .selective_scan import selective_scan

__all__ = [
    "UNVERIFIED_CUDA",
    "Impl",
    "block_attention",
    "cosine",
    "gather_tokens",
    "indexed_linear_",
    "lincomb",
    "moe_permute",
    "moe_unpermute",
    "patch_scores",
    "reference",
    "rel_l1",
    "sampled_wgrad",
    "sara_linear",
    "scatter_tokens",
    "selective_scan",
    "unverified_cuda",
]
