"""The library's defaults and named choices, in one place, importable without diffusers: where the
packaged models live (so ``VisCPMChat()`` works with no download), Paint's schedulers and sampling
presets, the ranker's candidate count and the memory switches. The CLI and the server read them from
here instead of retyping them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

KINDS = ("chat", "paint")
PACKAGED_BYTES_LIMIT = 25_000_000  # both default models together, so the wheel stays small

# Scheduler name -> (diffusers class name, overrides of the stored SD-2.1-base config); the class is
# looked up only when built, so reading the names costs no diffusers import.
# "ddpm" is the official sampler. diffusers 0.15, which made the reference, ignored
# `steps_offset` in DDPMScheduler (4 steps -> [750, 500, 250, 0]); today's DDPMScheduler applies
# it under "leading" spacing ([751, 501, 251, 1]), so the official schedule is "leading" with
# offset 0. The others read the stored config as diffusers' own Stable Diffusion pipelines do.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {"timestep_spacing": "leading", "steps_offset": 0}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
}

# Sampling presets: name -> (scheduler, steps). "official" is VisCPM's sampler. "fast" makes 2.5x
# fewer UNet calls; on ShapesWorld its adherence equals DDPM's at 50 steps within the noise of the
# held-out set, while the deterministic "dpm++" stays ~5 points lower at 15, 20 or 25 steps
# (bench/README-paint.md). An explicit scheduler or step count overrides the preset's.
SAMPLING_PRESETS: dict[str, tuple[str, int]] = {"official": ("ddpm", 50), "fast": ("dpm++-sde", 20)}
DEFAULT_PRESET = "official"
DEFAULT_GUIDANCE_SCALE = 7.5  # official; a model folder's generation_config.json may state its own
RANKER_CANDIDATES = 4  # official: the ranker picks the best of 4 images for each one returned


def has_default_model(kind: str) -> bool:
    """Whether a default ``kind`` model is packaged."""
    try:
        default_model_path(kind)
    except FileNotFoundError:
        return False
    return True


def default_model_path(kind: str) -> Path:
    """The folder of the packaged default ``kind`` model (``viscpm/assets/<kind>``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    folder = Path(str(resources.files("viscpm") / "assets" / kind))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no default {kind} model is packaged at {folder}; pass model_path= (an official "
            f"viscpm_{kind}_*_checkpoint.pt with vocab_path=, or a folder saved by save_pretrained)"
        )
    return folder


def is_packaged(kind: str, model_path: str | os.PathLike | None) -> bool:
    """Whether ``model_path`` is the packaged ``kind`` model (None, or its folder by any path), so it
    behaves the same (fp32; Paint self-ranked by the packaged chat model) however it is named."""
    if model_path is None:
        return True
    if not has_default_model(kind):
        return False
    try:
        return Path(model_path).resolve() == default_model_path(kind).resolve()
    except OSError:
        return False


def check_guidance_scale(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value!r}")


def sampling_preset(preset: str, scheduler, num_inference_steps: int | None) -> tuple:
    """The scheduler and step count of ``preset``, each unless given explicitly."""
    if preset not in SAMPLING_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SAMPLING_PRESETS)}")
    preset_scheduler, preset_steps = SAMPLING_PRESETS[preset]
    return (preset_scheduler if scheduler is None else scheduler,
            preset_steps if num_inference_steps is None else num_inference_steps)


def build_scheduler(name: str, config: dict):
    """The diffusers scheduler ``name`` (a key of :data:`SCHEDULERS`) from a stored scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    import diffusers  # here: diffusers takes seconds to import, and only painting needs it

    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**config, **overrides})


@dataclass(frozen=True)
class MemoryOptions:
    """Lower peak memory for some speed, through diffusers' own switches. Images equal the plain
    path's up to float rounding, except that VAE tiling blends the seams between its tiles (it
    engages only for latents larger than the VAE's ``sample_size`` tile).

    * ``attention_slicing``: UNet attention a slice of heads at a time ("auto": two halves, "max":
      one head at a time, an int: that many heads per slice), by diffusers'
      ``UNet2DConditionModel.set_attention_slice``. Its sliced processor replaces the fused
      ``scaled_dot_product_attention`` one, so it costs speed.
    * ``vae_slicing``: decode the images of a batch one at a time (``AutoencoderKL.enable_slicing``).
    * ``vae_tiling``: decode large images in overlapping tiles (``AutoencoderKL.enable_tiling``).
    """

    attention_slicing: int | Literal["auto", "max"] | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False

    def __post_init__(self):
        slicing = self.attention_slicing
        if slicing is not None and slicing not in ("auto", "max") and (
                isinstance(slicing, bool) or not isinstance(slicing, int) or slicing < 1):
            raise ValueError(f"attention_slicing must be 'auto', 'max', a positive number of heads or None, "
                             f"got {slicing!r}")

    def apply(self, unet, vae) -> None:
        """Switch these on in a diffusers UNet and VAE."""
        if self.attention_slicing is not None:
            unet.set_attention_slice(self.attention_slicing)
        if self.vae_slicing:
            vae.enable_slicing()
        if self.vae_tiling:
            vae.enable_tiling()
