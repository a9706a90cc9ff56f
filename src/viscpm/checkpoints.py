"""Reading, checking and writing checkpoints: official ``.pt`` files and our saved folders.

* Official files (``viscpm_chat_*_checkpoint.pt``) are plain torch state dicts with the official
  key names. They are read with ``weights_only=True`` (no code runs) and memory-mapped, and the
  model is built on the meta device and *assigned* those tensors, so a 20 GB file is not copied.
* Our folders hold ``config.json`` + ``model.safetensors`` (our key names) + ``vocab.txt``; big
  models are sharded (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``, the
  Hugging Face layout; ``viscpm convert`` writes them). Safetensors are memory-mapped too.
* ``quant=`` quantizes layer by layer while loading and gives each consumed layer's file pages
  back, so resident memory stays near the quantized size (no full copy in any float dtype).
* The architecture comes from a config — given, saved beside the weights, or a named preset whose
  keys and shapes must match the checkpoint exactly. It is never guessed from the weights.

Every failure is a ``CheckpointError`` that names the file and what is wrong.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import mmap
import os
import pickle
import sys
import types
import typing
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .models.keymap import KeyRules, official_to_ours, ours_to_official
from .quantization import quantize_module

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # sharded weights: {"weight_map": {key: shard file}}
VOCAB_NAME = "vocab.txt"
VAE_FOLDER = "vae"  # the Paint VAE (a diffusers AutoencoderKL folder) beside the weights
GENERATION_CONFIG_NAME = "generation_config.json"  # a model's own sampling defaults, as in transformers
MAX_LISTED = 8  # keys shown per category in an error message
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

ConfigT = TypeVar("ConfigT")


class CheckpointError(ValueError):
    """A checkpoint, config or vocab that cannot be used, with the reason and the file."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt``/``.bin`` (torch zip) or ``.safetensors`` file, or of the shards an
    ``.index.json`` lists, memory-mapped."""
    path = Path(path)
    if path.name.endswith(".index.json") and path.is_file():
        return _read_shards(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch/safetensors file): {error}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(state)


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index} is not a shard index (a JSON with a weight_map): {error!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map each key to a shard file name")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        # a shard is a file of this folder: an index must not make us read elsewhere ("../x", "/etc/x")
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if not parts or PurePosixPath(shard).is_absolute() or Path(shard).is_absolute() or ".." in parts:
            raise CheckpointError(f"{index} lists the shard {shard!r} outside its folder; shard names must be "
                                  f"file names inside {index.parent}")
        tensors = read_state_dict(index.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise CheckpointError(f"shard {index.parent / shard} does not hold the keys {index.name} lists for it "
                                  f"(missing {_listing(sorted(listed - set(tensors)))}, "
                                  f"extra {_listing(sorted(set(tensors) - listed))})")
        state.update(tensors)
    return state


def release_file_pages(tensor: torch.Tensor) -> None:
    """Give back the resident pages of a memory-mapped tensor (Linux; elsewhere a no-op).

    A mapped checkpoint keeps every page it has read resident until the whole file is unmapped,
    so quantizing a 20 GB checkpoint layer by layer would still peak at 20 GB + the result. The
    pages are only dropped from this process: touched again, they are re-read from the file.
    Only for tensors that map a file: on ordinary memory this would zero the data."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside this tensor only
    last = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _set_mmap_threshold(size: int) -> None:
    """Have glibc serve every allocation ≥ ``size`` bytes by its own mapping, returned to the system
    on free (process-wide; a no-op without glibc)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, size)


def is_official(state: Mapping[str, torch.Tensor], rules: KeyRules) -> bool:
    """True unless some key exists only under our names (some names, like ``mapping.0.weight``,
    are the same in both)."""
    return not any(ours_to_official(k, rules) is not None and official_to_ours(k, rules) is None for k in state)


def rename_from_official(
    state: Mapping[str, torch.Tensor], rules: KeyRules, unused: frozenset[str], source: Path
) -> dict[str, torch.Tensor]:
    """Official names -> ours; keys the forward never reads (``unused``) are dropped."""
    renamed, unknown = {}, []
    for key, tensor in state.items():
        if key in unused:
            continue
        ours = official_to_ours(key, rules)
        if ours is None:
            unknown.append(key)
        else:
            renamed[ours] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys {_listing(unknown)}; is this the right kind of checkpoint?")
    return renamed


def rename_to_official(state: Mapping[str, torch.Tensor], rules: KeyRules) -> dict[str, torch.Tensor]:
    return {ours_to_official(key, rules): tensor for key, tensor in state.items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    return f"[{shown}{f', … and {more} more' if more > 0 else ''}]"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path, rules: KeyRules | None = None) -> None:
    """Raise one error listing missing, unexpected and mis-shaped keys (official names if
    ``rules`` is given, since that is what the user's file holds)."""
    name = (lambda k: ours_to_official(k, rules) or k) if rules else (lambda k: k)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [name(k) for k in expected if k not in state]
    unexpected = [name(k) for k in state if k not in expected]
    misshaped = [
        f"{name(k)}: checkpoint {list(state[k].shape)} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(problems))


def recognise_preset(
    state: Mapping[str, torch.Tensor],
    presets: Mapping[str, ConfigT],
    build: Callable[[ConfigT], nn.Module],
    source: Path,
) -> ConfigT:
    """The preset whose model has exactly the checkpoint's keys and shapes (built on meta)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, config in presets.items():
        with torch.device("meta"):
            model = build(config)
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            logger.info("%s matches the %s preset", source, name)
            return config
    raise CheckpointError(
        f"{source} carries no config and matches none of the presets {sorted(presets)}; "
        f"pass config_path= (or put a {CONFIG_NAME} beside the weights)"
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"config {path} is not valid JSON: {error}") from None


def load_weights(
    model_path: str | os.PathLike,
    config_path: str | os.PathLike | None,
    *,
    config_from_dict: Callable[[dict], ConfigT],
    presets: Mapping[str, ConfigT],
    build: Callable[[ConfigT], nn.Module],
    rules: KeyRules,
    unused: frozenset[str] = frozenset(),
    quant: str | None = None,
    quant_part: str = "",
) -> tuple[nn.Module, ConfigT, Path]:
    """Build a model from a checkpoint file or our folder; returns (model, config, weights path).

    Config order: ``config_path``; ``config.json`` beside the weights; a preset matched by keys
    and shapes. The model is built on the meta device and takes the checkpoint's tensors as-is.
    ``quant`` (int8/int4) quantizes the submodule ``quant_part`` ("" = all) layer by layer,
    releasing each float layer's pages once its quantized twin exists.
    """
    model_path = Path(model_path)
    weights = model_path
    if model_path.is_dir():
        weights = model_path / INDEX_NAME if (model_path / INDEX_NAME).is_file() else model_path / WEIGHTS_NAME
    state = read_state_dict(weights)
    official = is_official(state, rules)
    if official:
        state = rename_from_official(state, rules, unused, weights)

    beside = weights.parent / CONFIG_NAME
    if config_path is not None:
        config = _parse_config(config_from_dict, Path(config_path))
    elif beside.is_file():
        config = _parse_config(config_from_dict, beside)
    else:
        config = recognise_preset(state, presets, build, weights)

    check_sizes_before_building(config, state, weights)
    with torch.device("meta"):
        model = build(config)
    check_state_dict(model, state, weights, rules if official else None)
    model.load_state_dict(state, strict=True, assign=True)
    if quant is not None:
        # Quantizing interleaves long-lived int8 layers with short-lived fp32 temporaries; by default
        # glibc raises its mapping threshold after the first big free and then carves both from one
        # heap, whose holes stay resident: we measured 2.3x the quantized size instead of 1.3x.
        _set_mmap_threshold(1 << 20)
        release = lambda old: [release_file_pages(t) for t in (*old.parameters(), *old.buffers())]
        quantize_module(model.get_submodule(quant_part), quant, on_replaced=release)
        # then activations up to 64 MiB are reused from the heap, not mapped (and page-faulted in)
        # afresh on every call: an int8 prefill measured 25 % faster
        _set_mmap_threshold(64 << 20)
    return model.eval(), config, weights


def _parse_config(config_from_dict: Callable[[dict], ConfigT], path: Path) -> ConfigT:
    data = read_config(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"config {path} must be a JSON object, got {_shown(data)}")
    config_class = getattr(config_from_dict, "__self__", None)
    problems = list(_type_problems(config_class, data, "")) if dataclasses.is_dataclass(config_class) else []
    try:
        config = None if problems else config_from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"config {path} is not a valid config: {error}") from None
    if config is not None:
        problems = list(_type_problems(type(config), config, ""))
    if problems:
        raise CheckpointError(f"config {path} has wrong types: " + "; ".join(problems[:MAX_LISTED]))
    return config


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _type_problems(kind: Any, value: Any, where: str) -> Iterator[str]:
    """What in ``value`` (a config or its JSON) does not have the type the config's fields declare,
    each as ``"llm.num_layers must be int, got str '2'"``. Keys the config does not know are left
    to ``from_dict`` (official configs carry extra run-time keys)."""
    if dataclasses.is_dataclass(kind):
        if dataclasses.is_dataclass(value):
            items = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        elif isinstance(value, dict):
            items = value
        else:
            yield f"{where or 'the config'} must be a JSON object, got {_shown(value)}"
            return
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            if f.name in items:
                yield from _type_problems(hints[f.name], items[f.name], f"{where}.{f.name}" if where else f.name)
        return
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if not any(not list(_type_problems(option, value, where)) for option in args):
            yield f"{where} must be {' or '.join(getattr(a, '__name__', str(a)) for a in args)}, got {_shown(value)}"
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    expected = {int: isinstance(value, int) and not isinstance(value, bool), float: number,
                bool: isinstance(value, bool), str: isinstance(value, str), type(None): value is None}
    if kind in expected:
        ok = expected[kind]
    elif kind is dict or origin is dict:
        ok = isinstance(value, dict)
    elif kind in (tuple, list) or origin in (tuple, list):
        ok = isinstance(value, tuple | list)
        if ok and args and args[0] is not Ellipsis:
            for i, item in enumerate(value):
                yield from _type_problems(args[0], item, f"{where}[{i}]")
    else:
        ok = True  # Any
    if not ok:
        yield f"{where} must be {getattr(kind, '__name__', str(kind))}, got {_shown(value)}"


def _layer_counts(value: Any, where: str = "") -> Iterator[tuple[str, int]]:
    """Every integer setting that counts layers (``num_layers``, the UNet's ``layers_per_block``)."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if "layers" in str(key) and isinstance(item, int):
                yield name, item
            else:
                yield from _layer_counts(item, name)


def check_sizes_before_building(config: Any, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Refuse a config that asks for more layers than the weights could hold, before building it:
    each layer has at least one tensor, so no layer count can exceed the number of tensors. (Even
    on the meta device, 200,000 layers take minutes and gigabytes of module objects; sizes such as
    ``vocab_size`` cost nothing there and are compared shape by shape after building.)"""
    for name, count in _layer_counts(config):
        if count > len(state):
            raise CheckpointError(f"{source}: the config's {name} = {count} cannot fit the checkpoint, which holds "
                                  f"only {len(state)} tensors; the config does not belong to these weights")


def find_vocab(weights: Path, vocab_path: str | os.PathLike | None) -> Path:
    """The vocab given, else ``vocab.txt`` beside the weights."""
    path = Path(vocab_path) if vocab_path is not None else weights.parent / VOCAB_NAME
    if not path.is_file():
        hint = "" if vocab_path is not None else " (pass vocab_path=, the CPM-Bee bee-format vocab)"
        raise CheckpointError(f"vocab not found: {path}{hint}")
    return path


def save_folder(model: nn.Module, config: Any, folder: str | os.PathLike, vocab_path: Path | None = None, *,
                dtype: torch.dtype | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``vocab.txt``) into ``folder``; with
    ``max_shard_size`` (bytes or "2GB") and more weights than that, shards + ``INDEX_NAME``
    instead. ``dtype`` casts floating tensors, one shard at a time (a mapped checkpoint is never
    copied whole).

    Each file is written to a temporary name and renamed, so an interrupted save never leaves a
    half-written file under the real name.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    cast = lambda t: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous()
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size or 2**62)
    if not split.is_sharded:
        (folder / INDEX_NAME).unlink(missing_ok=True)
        shard = {k: cast(v) for k, v in state.items()}
        _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(shard, tmp))
    else:
        (folder / WEIGHTS_NAME).unlink(missing_ok=True)
        total_size = 0
        for filename, keys in split.filename_to_tensors.items():
            shard = {k: cast(state[k]) for k in keys}
            _atomic_write(folder / filename, lambda tmp: save_file(shard, tmp))
            total_size += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
        index = {"metadata": {"total_size": total_size}, "weight_map": split.tensor_to_filename}
        _atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config.to_dict(), indent=2, ensure_ascii=False)))
    if vocab_path is not None:
        data = Path(vocab_path).read_bytes()
        _atomic_write(folder / VOCAB_NAME, lambda tmp: Path(tmp).write_bytes(data))
    return folder


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {describe_write_error(error)}") from None


def describe_write_error(error: BaseException) -> str:
    """A write failure in words; a full disk says so (safetensors and torch report it in their own words)."""
    if getattr(error, "errno", None) == errno.ENOSPC or "no space left" in str(error).lower():
        return "the disk is full (no space left on the device); free some disk space or save elsewhere"
    return str(error)


def load_vae(path: str | os.PathLike):
    """A diffusers ``AutoencoderKL`` from a local folder (``config.json`` + weights), or from the
    ``vae/`` subfolder of a local Stable Diffusion folder. Never downloads."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / VAE_FOLDER / "config.json").is_file():
        folder = folder / VAE_FOLDER
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"VAE not found at {path} (no config.json); the Paint checkpoint has no VAE: pass vae_path= a "
            f"local diffusers AutoencoderKL folder, e.g. stable-diffusion-2-1-base/vae, or put it in "
            f"{VAE_FOLDER}/ beside the checkpoint"
        )
    from diffusers import AutoencoderKL  # lazily: diffusers takes seconds to import

    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"cannot load the VAE from {folder}: {error}") from None
