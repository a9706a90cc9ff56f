"""Loading each model kind from a checkpoint, shared by the pipelines, ``train/`` and tools.

Each kind declares once what loading needs (its config class, named presets, builder and official
key rules): :data:`LM`, :data:`CHAT`, :func:`paint_kind`. :func:`load_chat` and :func:`load_paint` return
the components a pipeline is built from (``VisCPMChat.from_components(...)``), read and checked but
not yet placed on a device: where the model runs is the caller's choice.

Layer: above ``models``, ``checkpoints`` and ``tokenization`` (and the leaf ``pipelines.defaults``);
below the pipelines themselves, ``train/``, ``serve/`` and the CLI. The paint model is imported only
when a paint model is loaded: it pulls in diffusers, which takes seconds and which chat never needs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..checkpoints import (
    GENERATION_CONFIG_NAME,
    VAE_FOLDER,
    CheckpointError,
    find_vocab,
    load_vae,
    load_weights,
)
from ..models.chat import (
    CHAT_KEY_RULES,
    CHAT_PRESETS,
    CHAT_UNUSED_OFFICIAL_KEYS,
    ChatConfig,
    ChatModel,
)
from ..models.cpmbee import CPMBEE_KEY_RULES, CPMBEE_PRESETS, CPMBee, CPMBeeConfig
from ..models.keymap import KeyRules
from ..tokenization import CPMBeeTokenizer
from .defaults import DEFAULT_GUIDANCE_SCALE, check_guidance_scale

if TYPE_CHECKING:
    from ..models.paint import PaintModel


@dataclass(frozen=True)
class ModelKind:
    """What loading needs to know about one kind of model."""

    name: str
    config_class: type
    presets: Mapping[str, Any]
    build: Callable[..., nn.Module]  # (config, **freeze flags) -> model
    key_rules: KeyRules
    unused_official_keys: frozenset[str] = frozenset()  # in official files, never read by the forward
    quantized_part: str = "llm"  # what ``quant=`` quantizes: every decoded token reads all of it

    def load(self, model_path: str | os.PathLike, config_path: str | os.PathLike | None = None, *,
             quant: str | None = None, **build_options) -> tuple[nn.Module, Any, Path]:
        """(model, config, weights path) from an official file or our folder; ``build_options``
        are the builder's freeze flags (e.g. ``llm_trainable=False``)."""
        build = partial(self.build, **build_options) if build_options else self.build
        return load_weights(model_path, config_path, config_from_dict=self.config_class.from_dict,
                            presets=self.presets, build=build, rules=self.key_rules,
                            unused=self.unused_official_keys, quant=quant, quant_part=self.quantized_part)


LM = ModelKind("lm", CPMBeeConfig, CPMBEE_PRESETS, CPMBee, CPMBEE_KEY_RULES, quantized_part="")
CHAT = ModelKind("chat", ChatConfig, CHAT_PRESETS, ChatModel, CHAT_KEY_RULES, CHAT_UNUSED_OFFICIAL_KEYS)


@cache
def paint_kind() -> ModelKind:
    from ..models.paint import PAINT_KEY_RULES, PAINT_PRESETS, PaintConfig, PaintModel

    return ModelKind("paint", PaintConfig, PAINT_PRESETS, PaintModel, PAINT_KEY_RULES)


def check_vocab(tokenizer: CPMBeeTokenizer, model: nn.Module, weights: str | os.PathLike | None = None) -> None:
    """Refuse a tokenizer whose vocabulary is not the one the model's embedding was trained with."""
    config = model.config
    expected = getattr(config, "llm", config).vocab_size
    if tokenizer.vocab_size != expected:
        belongs = f"belongs to {weights}" if weights is not None else "belongs to the model"
        raise CheckpointError(f"vocab {tokenizer.vocab_path} has {tokenizer.vocab_size} tokens but the model expects "
                              f"{expected}; pass the vocab that {belongs}")


def load_tokenizer(model: nn.Module, weights: Path, vocab_path: str | os.PathLike | None = None) -> CPMBeeTokenizer:
    """The vocab given, else ``vocab.txt`` beside the weights; checked against the model."""
    tokenizer = CPMBeeTokenizer(find_vocab(weights, vocab_path))
    check_vocab(tokenizer, model, weights)
    return tokenizer


@dataclass(frozen=True)
class PaintDefaults:
    """A model's own sampling defaults, from ``generation_config.json`` beside its weights when
    present; what a call does not set. The official 7.5 costs a small model its colours: the
    packaged ShapesWorld model gets English colours right 53 % of the time at 7.5 and 68 % at 4,
    whole scenes half as often (docs/shapesworld.md).

    ``height``/``width``: the resolution the model was trained at, in pixels; None = the UNet's
    ``sample_size`` times the VAE's downscaling (512 for the official SD-2.1-base UNet). The packaged
    model states 64: painting it at 512 takes minutes and breaks the picture."""

    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        check_guidance_scale(self.guidance_scale)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")

    @classmethod
    def load(cls, folder: Path) -> PaintDefaults:
        path = folder / GENERATION_CONFIG_NAME
        if not path.is_file():
            return cls()
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(settings, dict):
                raise ValueError("it must hold a JSON object")
            unknown = sorted(set(settings) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(**settings)
        except (ValueError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not a valid paint generation config: {error}") from None

    def save(self, folder: Path) -> None:
        (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class ChatComponents:
    model: ChatModel
    tokenizer: CPMBeeTokenizer


@dataclass(frozen=True)
class PaintComponents:
    model: PaintModel
    vae: nn.Module  # a diffusers AutoencoderKL
    tokenizer: CPMBeeTokenizer
    defaults: PaintDefaults


def load_chat(model_path: str | os.PathLike, config_path: str | os.PathLike | None = None,
              vocab_path: str | os.PathLike | None = None, *, quant: str | None = None,
              **build_options) -> ChatComponents:
    """The chat model and its tokenizer from an official ``.pt`` or our folder (config order and
    ``quant``: :func:`viscpm.checkpoints.load_weights`; ``build_options``: ChatModel's freeze flags)."""
    model, _, weights = CHAT.load(model_path, config_path, quant=quant, **build_options)
    return ChatComponents(model, load_tokenizer(model, weights, vocab_path))


def load_paint(model_path: str | os.PathLike, config_path: str | os.PathLike | None = None,
               vocab_path: str | os.PathLike | None = None, vae_path: str | os.PathLike | None = None, *,
               quant: str | None = None, **build_options) -> PaintComponents:
    """The paint model, its VAE (``vae_path``, else ``vae/`` beside the weights), tokenizer and
    sampling defaults (``generation_config.json`` beside the weights)."""
    model, _, weights = paint_kind().load(model_path, config_path, quant=quant, **build_options)
    tokenizer = load_tokenizer(model, weights, vocab_path)
    defaults = PaintDefaults.load(weights.parent)
    vae = load_vae(vae_path if vae_path is not None else weights.parent / VAE_FOLDER)
    check_vae(vae, model)
    return PaintComponents(model, vae, tokenizer, defaults)


def check_vae(vae: nn.Module, model: PaintModel) -> None:
    if vae.config.latent_channels != model.unet.config.in_channels:
        raise CheckpointError(f"the VAE has {vae.config.latent_channels} latent channels but the UNet reads "
                              f"{model.unet.config.in_channels}; pass the Stable Diffusion 2.1-base VAE")
