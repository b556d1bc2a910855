"""Parameter-efficient adaptation of diffusion models: SaRA, LoRA (PEFT/diffusers files),
orthogonal adaptation, DiffFit, FeRA and Diffscaler; control and composition: ControlNet for DiT,
DivControl (an SVD-factored, instruction-gated ControlNet) and AFA (block-wise aggregation of
frozen DiTs). Each ``apply_*`` replaces target modules in place with
adapter layers (the original kept at ``<name>.base``), freezes everything else and returns the
trainable parameters; :func:`save_adapter` / :func:`load_adapter` store just the adapter
(safetensors) and :func:`merge_adapters` folds it into the base weights. See
:mod:`adaptdiff.adapters.base`."""

from .afa import AFAEnsemble, PredictionAverage, average_weights
from .base import (
    adapter_layers,
    adapters_disabled,
    load_adapter,
    merge_adapters,
    save_adapter,
    trainable_parameters,
)
from .controlnet import (
    ControlledDiT,
    DiTControlNet,
    controlnet,
    controlnet_state_dict_diffusers,
    load_controlnet_diffusers,
    save_controlnet_diffusers,
)
from .difffit import ScaledBranch, apply_difffit
from .diffscaler import (
    AffinerLinear,
    TaskSwitch,
    add_task,
    apply_diffscaler,
    diffscaler_parameters,
    set_task,
)
from .divcontrol import (
    DivControlNet,
    SVDLinear,
    divcontrol,
    divcontrol_loss,
    tailor_parameters,
)
from .fera import FeRALinear, apply_fera, band_energies, fecl_loss, fera_loss
from .lora import (
    LoraLinear,
    apply_lora,
    delete_adapter,
    load_lora,
    merge_lora,
    save_lora,
    set_adapter,
    unmerge_lora,
)
from .orthogonal import OrthogonalLoraLinear, apply_orthogonal_lora, merge_orthogonal
from .sara import (
    SaraConv,
    SaraLinear,
    apply_sara,
    load_sara,
    merge_sara,
    sara_default_lr,
    sara_nuclear_loss,
    sara_reselect,
    save_sara,
)

__all__ = [
    "ControlledDiT",
    "DiTControlNet",
    "DivControlNet",
    "SVDLinear",
    "divcontrol",
    "divcontrol_loss",
    "tailor_parameters",
    "controlnet",
    "controlnet_state_dict_diffusers",
    "load_controlnet_diffusers",
    "save_controlnet_diffusers",
    "AFAEnsemble",
    "AffinerLinear",
    "PredictionAverage",
    "TaskSwitch",
    "add_task",
    "apply_diffscaler",
    "average_weights",
    "diffscaler_parameters",
    "set_task",
    "FeRALinear",
    "LoraLinear",
    "OrthogonalLoraLinear",
    "SaraConv",
    "SaraLinear",
    "ScaledBranch",
    "adapter_layers",
    "adapters_disabled",
    "apply_difffit",
    "apply_fera",
    "apply_lora",
    "apply_orthogonal_lora",
    "apply_sara",
    "band_energies",
    "delete_adapter",
    "fecl_loss",
    "fera_loss",
    "load_adapter",
    "load_lora",
    "load_sara",
    "merge_adapters",
    "merge_lora",
    "merge_orthogonal",
    "merge_sara",
    "save_adapter",
    "save_lora",
    "save_sara",
    "sara_default_lr",
    "sara_nuclear_loss",
    "sara_reselect",
    "set_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
