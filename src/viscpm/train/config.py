"""Training configs: one small TOML file per run, read into frozen dataclasses.

    [model]                         # where the weights come from
    init = "runs/align/final"       # a saved folder (or official .pt) to continue from, or …
    config = "configs/tiny.json"    # … a config to build a fresh model from (with vocab =)
    [data]
    train = "data/captions.jsonl"
    [train]
    output_dir = "runs/sft"
    max_steps = 1000
    [lora]                          # optional; its presence switches LoRA on

Unknown keys are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSection:
    init: Path | None = None  # saved folder / official checkpoint to start from
    config: Path | None = None  # model config JSON for a fresh model
    vocab: Path | None = None  # vocab for a fresh model (or to override the one beside `init`)
    llm_init: Path | None = None  # chat-align / paint: the LLM from an `lm` run
    vae: Path | None = None  # paint stages: a diffusers AutoencoderKL folder (e.g. from a `vae` run)
    unet: str = "cross_attention"  # paint-xattn: train the UNet's "cross_attention" or "all" of it


@dataclass(frozen=True)
class DataSection:
    train: tuple[Path, ...]  # one data file/shard folder, or a list of them (read one after another)
    image_root: Path | None = None  # default: the folder of the data file
    max_tokens: int = 512  # longer samples are skipped and counted
    max_skipped_fraction: float = 0.05  # stop with an error once more records than this are bad
    caption_dropout: float = 0.1  # paint stages: share of empty captions, so guidance works


@dataclass(frozen=True)
class TrainSection:
    output_dir: Path
    max_steps: int
    seed: int = 0
    batch_size: int = 8  # global, over all processes
    micro_batch_size: int | None = None  # per process per forward; default: batch_size / processes
    learning_rate: float = 1e-4
    # peak rate of the CPM-Bee LLM's own weights when they train beside standard-initialised parts
    # (chat-sft's BEiT-3 and mapping); None = learning_rate. CPM-Bee keeps unit-scale weights and
    # divides each projection by sqrt(fan-in), so one Adam step moves them about sqrt(d) times
    # less, relative to their size, than an nn.Linear of the same width.
    llm_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float | None = 1.0
    save_every: int = 500
    log_every: int = 10
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None  # paint stages: Min-SNR-γ loss weights (diffusers' --snr_gamma; 5 is usual)


@dataclass(frozen=True)
class LoraSection:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "k", "v", "out")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection | None = None
    source: Path | None = field(default=None, compare=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "TrainConfig":
        """Read ``path``; ``overrides`` are ``section.key=value`` strings (value in TOML syntax,
        or a bare string), e.g. ``train.max_steps=10`` or ``model.init=runs/x/final``."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"training config not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"training config {path} is not valid TOML: {error}") from None
        for override in overrides:
            name, sep, text = override.partition("=")
            section, dot, key = name.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"override {override!r} must look like section.key=value")
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text  # a bare string such as a path
            raw.setdefault(section, {})[key] = value
        return cls.from_dict(raw, base=path.parent, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: Path = Path("."), source: Path | None = None) -> "TrainConfig":
        unknown = set(raw) - {"model", "data", "train", "lora"}
        if unknown:
            raise ValueError(f"unknown sections {sorted(unknown)} in the training config")
        for required in ("data", "train"):
            if required not in raw:
                raise ValueError(f"the training config needs a [{required}] section")
        config = cls(
            model=_section(ModelSection, raw.get("model", {}), base),
            data=_section(DataSection, raw["data"], base),
            train=_section(TrainSection, raw["train"], base),
            lora=_section(LoraSection, raw["lora"], base) if "lora" in raw else None,
            source=source,
        )
        config.validate()
        return config

    def validate(self) -> None:
        t = self.train
        if t.max_steps < 1 or t.batch_size < 1 or t.save_every < 1 or t.log_every < 1:
            raise ValueError("max_steps, batch_size, save_every and log_every must be positive")
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be positive")
        if t.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {t.lr_schedule!r}")
        if not 0 <= self.data.max_skipped_fraction <= 1:
            raise ValueError("max_skipped_fraction must be between 0 and 1")
        if t.learning_rate <= 0 or (t.llm_learning_rate is not None and t.llm_learning_rate <= 0):
            raise ValueError("learning_rate and llm_learning_rate must be positive")
        if t.snr_gamma is not None and t.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {t.snr_gamma}")
        if self.model.unet not in ("cross_attention", "all"):
            raise ValueError(f"[model] unet must be 'cross_attention' or 'all', got {self.model.unet!r}")


def _section(cls, raw: dict[str, Any], base: Path):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in [{cls.__name__.removesuffix('Section').lower()}]; "
                         f"known: {sorted(names)}")
    values = {}
    resolve = lambda v: Path(v) if Path(v).is_absolute() else base / v
    for key, value in raw.items():
        kind = str(names[key].type)
        if "tuple[Path" in kind:
            value = tuple(resolve(v) for v in ([value] if isinstance(value, (str, Path)) else value))
        elif "Path" in kind and value is not None:
            value = resolve(value)
        elif "tuple" in kind:
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"[{cls.__name__.removesuffix('Section').lower()}]: {error}") from None
