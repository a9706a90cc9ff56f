"""Where a loaded model's weights live: device and dtype, bitsandbytes on CUDA, and accelerate's
big-model dispatch (layers spread over GPUs, CPU and disk with ``device_map``)."""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch import nn

from .quantization import quantize_module

# layers accelerate may place whole on one device (never split inside one)
NO_SPLIT_MODULES = ["Block", "EncoderLayer"]
# offload folders of the live models of this process: accelerate names the files by weight name, so a
# second model (chat and paint both have llm.*) would overwrite the first one's weights
_OFFLOADED: weakref.WeakValueDictionary[Path, nn.Module] = weakref.WeakValueDictionary()


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
        # plus the blocks diffusers marks as unsplittable (a UNet's resnet and transformer blocks)
        no_split = set(NO_SPLIT_MODULES).union(*(getattr(m, "_no_split_modules", None) or () for m in model.modules()))
        budget = dict(max_memory) if max_memory else None  # a copy: accelerate edits the dict it is given
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=sorted(no_split))
    elif not isinstance(device_map, dict):
        raise ValueError(f'device_map must be "auto" or a dict of module name -> device, got {device_map!r}')
    if device_map.get("") == "disk":
        raise ValueError(f"max_memory {max_memory} leaves no room for even the first layer in memory; raise it")
    if "disk" in device_map.values():
        if offload_folder is None:
            raise ValueError("the device map offloads layers to disk: pass offload_folder= (a folder to write them to)")
        folder = Path(offload_folder).resolve()
        if _OFFLOADED.get(folder) is not None:
            raise ValueError(f"offload_folder {folder} holds another loaded model's weights; give each model its own")
        _OFFLOADED[folder] = model
    devices = [d for d in device_map.values() if d != "disk"]
    main_device = devices[0] if devices else "cpu"
    # int8/int4 weights are buffers: offload them too, or "disk" would keep them in memory
    return dispatch_model(model, device_map, main_device=main_device, offload_dir=offload_folder, offload_buffers=True)
