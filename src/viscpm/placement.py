"""Where a loaded model's weights live: device and dtype, bitsandbytes on CUDA, and accelerate's
big-model dispatch (layers spread over GPUs, CPU and disk with ``device_map``)."""
from __future__ import annotations

import os

import torch
from torch import nn

from .quantization import quantize_module

# layers accelerate may place whole on one device (never split inside one)
NO_SPLIT_MODULES = ["Block", "EncoderLayer"]


def place(module: nn.Module, device: str | torch.device, dtype: torch.dtype | None, quant: str | None) -> nn.Module:
    """Move and cast ``module``. On CUDA, ``quant`` quantizes through bitsandbytes after the move
    (it quantizes on the GPU); on CPU the loader has already quantized layer by layer
    (``load_weights(quant=...)``), and the casts leave int8/int4 buffers alone."""
    device = torch.device(device)
    nn.Module.to(module, device=device, dtype=dtype)
    if quant is not None and device.type == "cuda":
        quantize_module(module, quant)
    return module


def dispatch(model: nn.Module, device_map: str | dict[str, str | int], *, max_memory: dict | None = None,
             offload_folder: str | os.PathLike | None = None) -> nn.Module:
    """Spread ``model`` with accelerate: ``device_map="auto"`` fills the devices of ``max_memory``
    (e.g. ``{0: "20GiB", "cpu": "30GiB"}``) in order and offloads the rest to ``offload_folder``;
    or an explicit ``{module name: device | "disk"}``. Weights on disk are read back layer by layer
    at every forward (slow, but a model larger than memory runs)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_MODULES)
    elif not isinstance(device_map, dict):
        raise ValueError(f'device_map must be "auto" or a dict of module name -> device, got {device_map!r}')
    if device_map.get("") == "disk":
        raise ValueError(f"max_memory {max_memory} leaves no room for even the first layer in memory; raise it")
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("the device map offloads layers to disk: pass offload_folder= (a folder to write them to)")
    devices = [d for d in device_map.values() if d != "disk"]
    main_device = devices[0] if devices else "cpu"
    # int8/int4 weights are buffers: offload them too, or "disk" would keep them in memory
    return dispatch_model(model, device_map, main_device=main_device, offload_dir=offload_folder, offload_buffers=True)
