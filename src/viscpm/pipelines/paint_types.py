"""The typed inputs and outputs of a :meth:`VisCPMPaint.paint <viscpm.pipelines.paint.VisCPMPaint.paint>`
call (as diffusers keeps a pipeline's outputs beside it): its advanced options, what the per-step
callback sees, each painted image with its settings, the refusal of a flagged prompt, and the
official grid."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..rerank import Ranker
from ..safety import ImageChecker, PromptChecker, Refused
from .defaults import DEFAULT_PRESET, RANKER_CANDIDATES

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

GRID_MAX_COLUMNS = 8


def grid_image(images: Sequence[Image.Image]) -> Image.Image:
    """Images side by side, up to 8 per row, no padding (the official return value)."""
    width, height = images[0].size
    columns = min(len(images), GRID_MAX_COLUMNS)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))  # empty cells stay black
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@dataclass
class PaintStep:
    """What the per-step callback sees (tensors are the live ones: copy to keep)."""

    index: int
    timestep: int
    num_steps: int
    latents_in: torch.Tensor  # x_t (B, C, h, w)
    model_input: torch.Tensor  # what the UNet read: [uncond; cond] halves under guidance
    model_output: torch.Tensor  # the UNet's noise predictions, same layout
    noise_pred: torch.Tensor  # after guidance (B, C, h, w)
    latents: torch.Tensor  # x_{t-1}


@dataclass
class PaintedImage:
    image: Image.Image
    prompt: str
    negative_prompt: str | None
    seed: int | None  # this image's own seed (paint it alone with it); None with a caller's generator
    num_inference_steps: int
    scheduler: str
    guidance_scale: float
    flagged: bool = False  # the image safety checker replaced it with black
    score: float | None = None  # the ranker's score, when one picked this image
    metadata: dict = field(default_factory=dict)  # size; with a ranker: its name and every candidate's score
    flag_reason: str | None = None  # why the image safety checker flagged it

    def save(self, path: str | os.PathLike) -> None:
        """Write the image; PNG files carry the settings as a ``viscpm`` text chunk."""
        info = PngInfo()
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}
        info.add_text("viscpm", json.dumps(settings, ensure_ascii=False))
        self.image.save(path, pnginfo=info if str(path).lower().endswith(".png") else None)


class RefusedPrompt(Refused):
    """The prompt safety checker flagged the prompt; nothing was painted. ``reason`` says why."""


@dataclass(frozen=True)
class PaintOptions:
    """The advanced options of one :meth:`VisCPMPaint.paint` call, passed to it as keywords.

    ``preset`` picks the scheduler and step count (:data:`~viscpm.pipelines.defaults.SAMPLING_PRESETS`:
    "official" DDPM 50 steps, "fast" SDE-DPM-Solver++ 20 steps); an explicit ``scheduler`` (a name
    or a diffusers scheduler) or ``num_inference_steps`` overrides it. ``generator``/``latents``: the
    official way to seed, one generator shared by all images in order and (N, C, h, w) initial noise,
    N = prompts × images × candidates. ``callback`` sees every :class:`PaintStep`.

    The three switches override the painter's for this call: None keeps it, False turns it off,
    True turns it on (the painter's, or the default), a callable replaces it. With a ranker, each
    returned image is the best of ``num_candidates``."""

    scheduler: str | SchedulerMixin | None = None
    preset: str = DEFAULT_PRESET
    generator: torch.Generator | None = None
    latents: torch.Tensor | None = None
    callback: Callable[[PaintStep], None] | None = None
    prompt_safety_checker: bool | PromptChecker | None = None
    image_safety_checker: bool | ImageChecker | None = None
    add_ranker: bool | Ranker | None = None
    num_candidates: int = RANKER_CANDIDATES

    def __post_init__(self):
        n = self.num_candidates
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_candidates must be a positive integer, got {n}")

    @classmethod
    def from_keywords(cls, options: dict) -> PaintOptions:
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"paint() got unexpected keyword arguments {unknown}; its advanced options are "
                            f"{[f.name for f in fields(cls)]}")
        return cls(**options)
