"""SaRA: train the smallest entries of the frozen weights (Hu et al., ICLR 2025, arXiv 2409.06633).

The entries of each weight with ``|w| < threshold`` (or its smallest ``fraction``) are
"temporarily ineffective": re-using them for the new task keeps the base model's prior.
Each selection is stored as sorted int64 flat indices (a buffer) plus a ``values`` Parameter;
no boolean mask of the weight's size is kept, and the base weights stay frozen (never a
``.grad``, never an optimizer state).

- ``nn.Linear`` layers run through :func:`adaptdiff.ops.sara_linear`, whose backward computes the
  values' gradient with :func:`adaptdiff.ops.sampled_wgrad`: no dense weight gradient exists.
- Convolutions are handled in Python: the forward writes the values into a transient copy of
  the weight, and autograd computes that layer's dense weight gradient, which is gathered at the
  selected entries and freed at once (one layer's dense gradient at a time, as SaRA's
  reference "unstructural backpropagation" does).

The recipe: :func:`sara_nuclear_loss` (the low-rank penalty on one random 2-D layer per step),
:func:`sara_reselect` (progressive re-selection of the entries small at that point: some leave,
frozen at what they learned, others enter), :func:`sara_default_lr`. Files hold only the
sparse values and their indices (:func:`save_sara`, :func:`load_sara`); :func:`merge_sara` folds
them into plain modules. Example::

    params = apply_sara(model, threshold=2e-3)
    opt = torch.optim.AdamW(params, lr=sara_default_lr(2e-3), weight_decay=1e-2)
    loss = diffusion_loss(model, batch) + sara_nuclear_loss(model)
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from ..ops import sara_linear

__all__ = [
    "SaraConv",
    "SaraLinear",
    "apply_sara",
    "load_sara",
    "merge_sara",
    "sara_default_lr",
    "sara_layers",
    "sara_nuclear_loss",
    "sara_reselect",
    "save_sara",
]

DEFAULT_THRESHOLD = 2e-3
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sara_default_lr(threshold: float = DEFAULT_THRESHOLD) -> float:
    """The reference code's learning rate when none is given: ``1e-3 * exp(-350 * threshold)``
    (about 5e-4 at the default threshold); use it with AdamW, weight decay 1e-2."""
    return 1e-3 * math.exp(-350.0 * threshold)


class _SaraLayer(nn.Module):
    """Shared part: ``base`` (frozen, in place of the original), ``indices`` and ``values``."""

    adapter_kind = "sara"

    def __init__(
        self, base: nn.Module, indices: Tensor, threshold: float, fraction: float | None = None
    ):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.register_buffer("indices", indices.to(torch.int64))
        w = base.weight.detach()
        # The selected entries start at their current values (no sign flip).
        self.values = nn.Parameter(w.reshape(-1)[self.indices].clone())
        self.threshold = float(threshold)  # |w| below it is "small" (re-selection's rule)
        self.fraction = fraction  # selected as the smallest fraction: re-selection keeps it
        # Entries that left the selection at a re-selection, frozen at what they learned (also
        # written into the base weight): files carry them so a fresh model loads the same weight.
        self.register_buffer("frozen_indices", indices.new_zeros(0, dtype=torch.int64), False)
        self.register_buffer("frozen_values", w.new_zeros(0), False)

    def effective_weight(self) -> Tensor:
        """The weight with the values written in (a dense copy: for merging and tests)."""
        w = self.base.weight.detach()
        flat = w.reshape(-1).index_put((self.indices,), self.values.detach())
        return flat.view_as(w)

    def sparse_matrix(self) -> Tensor:
        """Dense ``weight.shape`` tensor, zero except the values (differentiable in them)."""
        w = self.base.weight
        zeros = w.new_zeros(w.numel())
        return zeros.index_put((self.indices,), self.values).view_as(w)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        sd = {"indices": self.indices, "values": self.values.detach()}
        if self.frozen_indices.numel():  # after a re-selection moved entries out
            sd.update(frozen_indices=self.frozen_indices, frozen_values=self.frozen_values)
        return sd

    def _check_indices(self, idx: Tensor, vals: Tensor, what: str) -> Tensor:
        idx, numel = idx.to(torch.int64), self.base.weight.numel()
        if idx.dim() != 1 or vals.shape != idx.shape:
            raise ValueError(
                f"SaRA layer: {what} indices and values must be 1-D of one length, got "
                f"{list(idx.shape)} and {list(vals.shape)}"
            )
        if idx.numel() and (idx.min() < 0 or idx.max() >= numel or (idx[1:] <= idx[:-1]).any()):
            raise ValueError(
                f"SaRA layer: {what} indices must be sorted, unique and in [0, {numel})"
            )
        return idx

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        keys = set(sd)
        frozen = {"frozen_indices", "frozen_values"}
        if keys not in ({"indices", "values"}, {"indices", "values"} | frozen):
            raise ValueError(
                f"SaRA layer expects the keys ['indices', 'values'] (and ['frozen_indices', "
                f"'frozen_values'] after a re-selection), got {sorted(keys)}"
            )
        idx = self._check_indices(sd["indices"], sd["values"], "selected")
        vals = sd["values"]
        w = self.base.weight
        if keys > {"indices", "values"}:
            f_idx = self._check_indices(sd["frozen_indices"], sd["frozen_values"], "frozen")
            if torch.isin(f_idx, idx).any():
                raise ValueError("SaRA layer: an entry is both frozen and selected")
            f_idx, f_vals = f_idx.to(w.device), sd["frozen_values"].to(w.device, w.dtype)
            with torch.no_grad():
                w.view(-1).index_put_((f_idx,), f_vals)
            self.frozen_indices, self.frozen_values = f_idx, f_vals.clone()
        self.indices = idx.to(w.device)
        with torch.no_grad():
            if self.values.shape == vals.shape:
                self.values.copy_(vals)
            else:  # a different selection (e.g. after re-selection): a new Parameter
                self.values = nn.Parameter(vals.to(w.device, w.dtype).clone())

    def merged(self) -> nn.Module:
        import copy

        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.effective_weight())
        return plain


class SaraLinear(_SaraLayer):
    """``nn.Linear`` with SaRA values: one :func:`~adaptdiff.ops.sara_linear` call."""

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast the op casts to the autocast dtype itself, as nn.Linear does.
        return sara_linear(x, self.base.weight, self.base.bias, self.indices, self.values)


class _GatherWeightGrad(torch.autograd.Function):
    """Forward: the weight with the values written in. Backward: the (dense) weight gradient
    gathered at the indices; nothing for the weight, so it is freed right after."""

    @staticmethod
    def forward(ctx, weight, indices, values):
        ctx.save_for_backward(indices)
        return weight.reshape(-1).index_put((indices,), values).view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, None, grad.reshape(-1)[indices]


class SaraConv(_SaraLayer):
    """Convolution with SaRA values (Python path: a dense weight gradient per layer, gathered
    to the values and freed at once)."""

    def forward(self, x: Tensor) -> Tensor:
        w = _GatherWeightGrad.apply(self.base.weight.detach(), self.indices, self.values)
        return self.base._conv_forward(x, w, self.base.bias)


def _select(weight: Tensor, threshold: float | None, fraction: float | None):
    a = weight.detach().abs().reshape(-1)
    if fraction is not None:
        k = round(fraction * a.numel())
        if k == 0:
            return a.new_zeros(0, dtype=torch.int64), 0.0
        small = torch.topk(a.float(), k, largest=False)
        # Re-selection keeps what is still at or below the largest selected magnitude.
        return small.indices.sort().values, float(small.values.max()) * (1 + 1e-6) + 1e-30
    return torch.nonzero(a < threshold).reshape(-1), float(threshold)


def _matches(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def apply_sara(
    model: nn.Module,
    threshold: float | None = None,
    fraction: float | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[nn.Parameter]:
    """Replace every ``nn.Linear`` and convolution of ``model`` by a SaRA layer, in place.

    Args:
        model: any module; all its parameters are frozen.
        threshold: train the entries with ``|w| < threshold`` (default 2e-3 when neither this
            nor ``fraction`` is given).
        fraction: instead, train the smallest ``fraction`` of each weight's entries by ``|w|``.
        include: regular expressions; when given, only modules whose qualified name matches
            one of them (``re.search``) are adapted.
        exclude: regular expressions of module names to leave alone.

    Returns:
        The trainable ``values`` Parameters, one per adapted layer (layers with no selected
        entry are left as they were). Biases and norms stay frozen.
    """
    if threshold is not None and fraction is not None:
        raise ValueError("apply_sara: give threshold or fraction, not both")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"apply_sara: fraction must be in [0, 1], got {fraction}")
    if fraction is None and threshold is None:
        threshold = DEFAULT_THRESHOLD
    if threshold is not None and threshold <= 0:
        raise ValueError(f"apply_sara: threshold must be positive, got {threshold}")
    model.requires_grad_(False)
    inside = {f"{n}.base" for n, _ in sara_layers(model)}  # already adapted: leave alone
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name
        and name not in inside
        and type(m) in (nn.Linear, *_CONVS)
        and (include is None or _matches(name, include))
        and not (exclude and _matches(name, exclude))
    ]
    params = []
    for name, m in targets:
        indices, thr = _select(m.weight, threshold, fraction)
        if indices.numel() == 0:
            continue
        layer = (SaraLinear if isinstance(m, nn.Linear) else SaraConv)(m, indices, thr, fraction)
        _replace(model, name, layer)
        params.append(layer.values)
    return params


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def sara_layers(model: nn.Module) -> list[tuple[str, _SaraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SaraLayer)]


def _randomized_nuclear(P: Tensor, q: int, power_iters: int, generator) -> Tensor:
    """Sum of the top-q singular values of P from a randomised range finder (Halko et al.).
    The basis is found without gradient; the gradient through ``Q^T P`` is ``Q U_q V_q^T``."""
    with torch.no_grad():
        Pf = P.detach().float()
        omega = torch.randn(P.shape[1], q + 8, generator=generator).to(Pf.device)
        Q = torch.linalg.qr(Pf @ omega).Q
        for _ in range(power_iters):
            Q = torch.linalg.qr(Pf @ (Pf.t() @ Q)).Q
    return torch.linalg.svdvals(Q.t().to(P.dtype) @ P)[:q].sum()


def sara_nuclear_loss(
    model: nn.Module,
    lam: float = 5e-4,
    *,
    min_dim: int = 64,
    exact_max_dim: int = 512,
    q: int = 32,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SaRA's low-rank constraint: ``lam * ||P||_*`` for ONE randomly chosen 2-D SaRA layer,
    where ``P`` is the layer's trainable entries as a matrix (zero elsewhere).

    Eligible layers: Linear ones with ``min(O, I) > min_dim`` and more than 100 values.
    Exact ``svdvals`` when ``min(O, I) <= exact_max_dim``, else a randomised top-``q`` SVD
    (2 power iterations). That layer's dense ``P`` exists for this call only. Returns a zero
    (no graph) when no layer is eligible.
    """
    eligible = [
        m
        for _, m in sara_layers(model)
        if isinstance(m, SaraLinear)
        and min(m.base.weight.shape) > min_dim
        and m.values.numel() > 100
    ]
    if not eligible:
        return torch.zeros(())
    layer = eligible[int(torch.randint(len(eligible), (1,), generator=generator))]
    P = layer.sparse_matrix()
    if min(P.shape) <= exact_max_dim:
        return lam * torch.linalg.svdvals(P.float()).sum()
    return lam * _randomized_nuclear(P.float(), q, power_iters, generator)


@torch.no_grad()
def sara_reselect(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    threshold: float | None = None,
    fraction: float | None = None,
) -> list[nn.Parameter]:
    """Progressive re-selection (SaRA's progressive parameter adjustment): select again, over
    the whole current weight, the entries that are small at this point, and train those.

    Per SaRA layer, as the reference's ``update_params`` does:

    1. the trained values are written into the base weight, so an entry that leaves the
       selection stays frozen at what it learned ("became effective");
    2. the selection is recomputed on that weight: ``|w| < threshold`` (the layer's own
       threshold, or ``threshold=`` given here), or, for a layer made with ``fraction``, its
       smallest ``fraction`` of entries (adaptdiff's percentile form; ``fraction=`` overrides);
    3. the new values start at the weight's current entries (trained ones keep their values,
       entering ones start from the base weight).

    Entries leave when they grew past the rule and enter when the rule picks them now: with a
    fixed threshold a frozen entry (>= threshold when selected) can enter only if the base
    weight or the threshold changed, so, as in the reference, the selection then only shrinks;
    with ``fraction`` the entries that grew make room for frozen ones that are now among the
    smallest. Layers that had no selected entry were never adapted and are not considered.

    Returns the new ``values`` Parameters. With ``optimizer``, the old values are taken out of
    its parameter groups and the new ones put into the group that held them (its
    hyper-parameters, e.g. a scheduled ``lr``, are kept), and its state is cleared: the
    reference rebuilds the optimizer here, which resets the Adam moments.
    """
    if threshold is not None and fraction is not None:
        raise ValueError("sara_reselect: give threshold or fraction, not both")
    if threshold is not None and threshold <= 0:
        raise ValueError(f"sara_reselect: threshold must be positive, got {threshold}")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"sara_reselect: fraction must be in [0, 1], got {fraction}")
    old_values, params = [], []
    for _, layer in sara_layers(model):
        w = layer.base.weight
        w.view(-1).index_put_((layer.indices,), layer.values.detach().to(w.dtype))
        if threshold is not None:
            layer.fraction = None
            indices, thr = _select(w, threshold, None)
        elif fraction is not None or layer.fraction is not None:
            layer.fraction = fraction if fraction is not None else layer.fraction
            indices, thr = _select(w, None, layer.fraction)
        else:
            indices, thr = _select(w, layer.threshold, None)
        layer.threshold = thr if indices.numel() or layer.fraction is None else layer.threshold
        old_values.append(layer.values)
        indices = indices.to(w.device)
        changed = torch.cat([layer.frozen_indices, layer.indices])  # entries moved off the base
        changed = changed.unique()  # sorted
        frozen = changed[~torch.isin(changed, indices)]
        layer.frozen_indices = frozen
        layer.frozen_values = w.detach().reshape(-1)[frozen].clone()
        layer.indices = indices
        layer.values = nn.Parameter(w.detach().reshape(-1)[layer.indices].clone())
        params.append(layer.values)
    if optimizer is not None:
        _swap_optimizer_params(optimizer, old_values, params)
    return params


def _swap_optimizer_params(optimizer, old: list[Tensor], new: list[nn.Parameter]) -> None:
    gone = {id(p) for p in old}
    home = None
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in gone]
        if len(kept) != len(group["params"]) and home is None:
            home = group
        group["params"] = kept
    if home is None:  # the optimizer held none of them: they join its first group
        if not optimizer.param_groups:
            raise ValueError("sara_reselect: the optimizer has no parameter group")
        home = optimizer.param_groups[0]
    home["params"] = home["params"] + list(new)
    optimizer.state.clear()


def save_sara(model: nn.Module, path: str) -> None:
    """Write the SaRA layers' values and indices (int32 when they fit) to a safetensors file;
    after :func:`sara_reselect`, also the entries it froze (``frozen_indices``/``frozen_values``),
    so that loading into a freshly adapted base model gives the same weights."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in sara_layers(model):
        small = layer.base.weight.numel() < 2**31
        for key, t in layer.adapter_state_dict().items():  # + frozen_* after a re-selection
            if key.endswith("indices") and small:
                t = t.to(torch.int32)
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
    save_file(tensors, path, metadata={"adaptdiff_adapter_kind": "sara"})


def load_sara(model: nn.Module, path: str) -> None:
    """Load :func:`save_sara`'s file into a model already prepared with :func:`apply_sara`
    (same layer names). Raises ``ValueError`` on missing or unexpected layers."""
    from safetensors.torch import load_file

    sd = load_file(path)
    layers = dict(sara_layers(model))
    by_layer: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        name, _, local = key.rpartition(".")
        by_layer.setdefault(name, {})[local] = t
    missing, unexpected = sorted(set(layers) - set(by_layer)), sorted(set(by_layer) - set(layers))
    if missing or unexpected:
        raise ValueError(f"load_sara: missing layers {missing}, unexpected layers {unexpected}")
    for name, layer in layers.items():
        layer.load_adapter_state_dict(by_layer[name])


def merge_sara(model: nn.Module) -> nn.Module:
    """Replace every SaRA layer by its plain module with the values folded in; returns model."""
    for name, layer in sara_layers(model):
        _replace(model, name, layer.merged())
    return model
