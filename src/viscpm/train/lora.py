"""LoRA adapters through peft, and merging them back for a plain checkpoint.

peft injects adapters into any ``nn.Linear`` by name (our CPM-Bee projections subclass it). Its own
merge assumes ``y = W x``; CPM-Bee's layers compute ``W x / s`` (or ``W (x / s)``), while the
adapter adds its ``B A x`` unscaled, so the merged weight must be ``W + s·ΔW``. ``merge_lora``
does that and swaps each adapted layer back for its base layer, so saved weights load into the
plain model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..extras import require
from .config import LoraSection

ADAPTER = "default"


def add_lora(module: nn.Module, section: LoraSection) -> nn.Module:
    """Inject adapters into ``module`` in place; only the adapters of ``module`` stay trainable."""
    peft = require("peft", "train", "LoRA training")
    config = peft.LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                             target_modules=list(section.target_modules))
    try:
        return peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as error:
        raise ValueError(f"LoRA target_modules {list(section.target_modules)} matched nothing usable: {error}") from None


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the adapter layers (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        scale = getattr(base, "scale", 1.0)  # CPM-Bee's 1/sqrt(fan-in), applied to W but not to the adapter
        base.weight += layer.get_delta_weight(ADAPTER).to(base.weight.dtype) * scale
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    return module
