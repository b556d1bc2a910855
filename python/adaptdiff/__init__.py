"""adaptdiff: fast, cheap adaptation and sampling of diffusion models.

Kernels are registered as ``torch.ops.adaptdiff.*``; :mod:`adaptdiff.ops` holds the typed
wrappers. Importing adaptdiff never initialises CUDA. Load order (torch, then the native
library, then the fakes and autograd in ``ops``) is kept by ``ops`` importing ``_loader``.
"""

import torch  # noqa: F401  (loads libtorch before the native library)

from . import ops
from ._loader import build_info, has_kernel, op_names

__version__ = "0.1.0"

__all__ = ["build_info", "has_kernel", "op_names", "ops", "__version__"]
