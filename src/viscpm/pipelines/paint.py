"""VisCPMPaint: paint from Chinese or English prompts. A thin pipeline with no model math:
check inputs → encode prompt and negative → prepare latents → denoise with guidance → decode →
postprocess → safety → rank.

The seed API matches the official one, so VisCPM users can switch::

    painter = VisCPMPaint("viscpm_paint_zhplus_checkpoint.pt")   # vocab.txt, vae/ beside it
    image = painter.generate("海上生明月，天涯共此时")              # one PIL image (a grid)

Beyond it, ``painter.paint(...)`` (also ``painter(...)``) returns one :class:`PaintedImage` per
image with its seed, steps, scheduler and guidance, takes ``height``/``width``, a scheduler by
name, a seed, a per-step callback, and a list of prompts; with ``image=`` (and ``strength``) it
paints image-to-image, with ``mask_image=`` it inpaints (see :mod:`viscpm.pipelines.edit`).

Safety and ranking are pluggable parts (:mod:`viscpm.safety`, :mod:`viscpm.rerank`), chosen when
the painter is built and switchable per call: the prompt checker refuses a flagged prompt
(:class:`RefusedPrompt`, nothing painted), the image checker blackens flagged images and marks
them, the ranker paints ``num_candidates`` images for each one returned and keeps the best.

Choices where the official code was silent or fragile:
* an empty prompt is allowed: it is exactly the official unconditional prompt, so it paints an
  unconditional sample;
* prompts over ``MAX_PROMPT_TOKENS`` are refused with a clear error (not truncated: cutting the
  structured prompt would change what the model reads without saying so);
* ``guidance_scale <= 1`` turns classifier-free guidance off, as diffusers does;
* a model folder may carry its own default guidance in ``generation_config.json`` (as transformers
  keeps per-checkpoint generation defaults): without one it is the official 7.5;
* ``<`` in a prompt is literal text (the official converter crashed on e.g. ``<b>``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import (
    GENERATION_CONFIG_NAME, VAE_FOLDER, CheckpointError, find_vocab, load_vae, load_weights, save_folder,
)
from ..models.cpmbee import CPMBeeInputs
from ..models.paint import PAINT_KEY_RULES, PAINT_PRESETS, PaintConfig, PaintModel
from ..prompt import collate_for_forward, convert_data_to_id
from ..placement import dispatch, place
from ..quantization import refuse_quantized
from ..rerank import Ranker, load_ranker
from ..safety import (
    ImageChecker, PromptChecker, Refused, load_image_checker, load_prompt_checker, screen_images, verdict,
)
from ..tokenization import CPMBeeTokenizer
from .chat import VisCPMChat
from .defaults import default_model_path, has_default_model
from .edit import EditSource, edit_metadata, prepare_edit

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 3000  # CPM-Bee's input limit in VisCPM (max_inp_length); longer is refused
RANKER_CANDIDATES = 4  # official: the ranker picks the best of 4 images for each one returned
GRID_MAX_COLUMNS = 8
SWITCH_LOADERS = {"prompt_safety_checker": load_prompt_checker, "image_safety_checker": load_image_checker,
                  "add_ranker": load_ranker}  # switch name -> what turns its value into a checker or ranker

# Scheduler name -> (diffusers class, overrides of the stored SD-2.1-base config).
# "ddpm" is the official sampler. diffusers 0.15, which made the reference, ignored
# `steps_offset` in DDPMScheduler (4 steps -> [750, 500, 250, 0]); today's DDPMScheduler applies
# it under "leading" spacing ([751, 501, 251, 1]), so the official schedule is "leading" with
# offset 0. The others read the stored config as diffusers' own Stable Diffusion pipelines do.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {"timestep_spacing": "leading", "steps_offset": 0}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
}

# Sampling presets: name -> (scheduler, steps). "official" is VisCPM's sampler. "fast" makes 2.5x
# fewer UNet calls; on ShapesWorld its adherence equals DDPM's at 50 steps within the noise of the
# held-out set, while the deterministic "dpm++" stays ~5 points lower at 15, 20 or 25 steps
# (bench/README-paint.md). An explicit scheduler or step count overrides the preset's.
SAMPLING_PRESETS: dict[str, tuple[str, int]] = {"official": ("ddpm", 50), "fast": ("dpm++-sde", 20)}


def check_guidance_scale(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class PaintDefaults:
    """A model's own sampling defaults, from ``generation_config.json`` beside its weights when
    present; what a call does not set. The official 7.5 costs a small model its colours: the
    packaged ShapesWorld model gets English colours right 53 % of the time at 7.5 and 68 % at 4,
    whole scenes half as often (docs/shapesworld.md).

    ``height``/``width``: the resolution the model was trained at, in pixels; None = the UNet's
    ``sample_size`` times the VAE's downscaling (512 for the official SD-2.1-base UNet). The packaged
    model states 64: painting it at 512 takes minutes and breaks the picture."""

    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None

    def __post_init__(self):
        check_guidance_scale(self.guidance_scale)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")

    @classmethod
    def load(cls, folder: Path) -> "PaintDefaults":
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


class RefusedPrompt(Refused):
    """The prompt safety checker flagged the prompt; nothing was painted. ``reason`` says why."""


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


def sampling_preset(preset: str, scheduler: str | SchedulerMixin | None,
                    num_inference_steps: int | None) -> tuple[str | SchedulerMixin, int]:
    """The scheduler and step count of ``preset``, each unless given explicitly."""
    if preset not in SAMPLING_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SAMPLING_PRESETS)}")
    preset_scheduler, preset_steps = SAMPLING_PRESETS[preset]
    return (preset_scheduler if scheduler is None else scheduler,
            preset_steps if num_inference_steps is None else num_inference_steps)


def build_scheduler(name: str, config: dict) -> SchedulerMixin:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config({**config, **overrides})


def candidate_seed(seed: int, index: int) -> int:
    """The seed of ranking candidate ``index`` of the image seeded ``seed``: the seed itself first
    (so ranking off paints candidate 0), then seeds drawn from ``(seed, index)``, which no other
    image's ``seed + k`` reaches in practice. Candidates depend on the image's seed only, so the
    seed reported for an image repaints it alone with the same settings, ranking included."""
    if index == 0:
        return seed
    drawn = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(drawn) >> 1  # 63 bits: any torch.Generator accepts it


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


def _ranking_chat(model_path: str | os.PathLike | None = None) -> VisCPMChat:
    """A chat model to self-rerank with, the packaged one by default (candidates pass Paint's checker)."""
    return VisCPMChat(model_path, image_safety_checker=False)


def _is_packaged_paint(model_path: str | os.PathLike | None) -> bool:
    """Whether ``model_path`` is the packaged paint model (None, or its folder by any path), so it
    behaves the same (fp32, self-ranked by the packaged chat model) however it is named."""
    if model_path is None:
        return True
    if not has_default_model("paint"):
        return False
    try:
        return Path(model_path).resolve() == default_model_path("paint").resolve()
    except OSError:
        return False


class VisCPMPaint:
    """Text to image. ``model_path``: an official ``.pt``, our saved folder, or None for the model
    shipped with the package (loaded in fp32 unless ``dtype`` says otherwise).

    The switches (details in :mod:`viscpm.safety` and :mod:`viscpm.rerank`):

    * ``prompt_safety_checker``: ``None``/``True`` the offline lexicon checker; a folder: the
      official BERT classifier; ``False`` off; or a callable ``(str) -> bool | SafetyResult``.
    * ``image_safety_checker``: ``None`` NudeNet when ``viscpm[safety]`` is installed, else off
      (logged); ``True`` NudeNet or an error; a folder: the official Stable Diffusion checker;
      ``False`` off; or a callable ``(PIL.Image) -> bool | SafetyResult``.
    * ``add_ranker``: ``None`` self-reranking with VisCPM-Chat when one is available (painting
      with the packaged model uses the packaged chat model), else off (logged); ``True`` the same
      or an error; a VisCPMChat; a folder: Chinese-CLIP (the official ranker) or a chat model;
      ``False`` off; or a callable ``(prompt, images) -> scores``.

    Each can be overridden for one call of :meth:`paint`.

    ``quant``: ``"int8"``/``"int4"`` weight-only quantization of the CPM-Bee text encoder.

    ``device_map`` (``"auto"`` or ``{module: device | "disk"}``, names as in the model:
    ``llm.layers.0``, ``bridge``, ``unet``…), ``max_memory``, ``offload_folder``: spread the model
    over GPUs, CPU and disk with accelerate (see :func:`viscpm.placement.dispatch`), e.g. the 10B
    text encoder's layers on disk; the VAE stays on ``device``, where latents live."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        image_safety_checker: bool | str | os.PathLike | ImageChecker | None = None,
        prompt_safety_checker: bool | str | os.PathLike | PromptChecker | None = None,
        add_ranker: bool | str | os.PathLike | Ranker | None = None,
        vocab_path: str | os.PathLike | None = None,
        vae_path: str | os.PathLike | None = None,
        *,
        config_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        progress_bar: bool = True,
        memory: MemoryOptions | None = None,
        quant: str | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
    ):
        # resolved first, so a wrong switch fails before gigabytes are read
        packaged = _is_packaged_paint(model_path)
        packaged_chat = _ranking_chat if packaged and has_default_model("chat") else None
        self.prompt_safety_checker: PromptChecker | None = load_prompt_checker(prompt_safety_checker)
        self.image_safety_checker: ImageChecker | None = load_image_checker(image_safety_checker)
        self.ranker: Ranker | None = load_ranker(add_ranker, chat=packaged_chat, open_chat=_ranking_chat)
        self._default_chat = packaged_chat
        self._bundled: dict[str, object] = {}  # defaults loaded for a call that turned a switch on
        if packaged:
            model_path, dtype = default_model_path("paint"), dtype or torch.float32
        on_cpu = torch.device(device).type == "cpu"  # CPU: quantized while loading; CUDA: by bitsandbytes
        model, config, weights = load_weights(
            model_path, config_path, config_from_dict=PaintConfig.from_dict, presets=PAINT_PRESETS,
            build=PaintModel, rules=PAINT_KEY_RULES,
            quant=quant if on_cpu else None, quant_part="llm",
        )
        self.vocab_path = find_vocab(weights, vocab_path)
        self.defaults = PaintDefaults.load(weights.parent)
        self.tokenizer = CPMBeeTokenizer(self.vocab_path)
        if self.tokenizer.vocab_size != config.llm.vocab_size:
            raise CheckpointError(f"vocab {self.vocab_path} has {self.tokenizer.vocab_size} tokens but the model "
                                  f"expects {config.llm.vocab_size}; pass the vocab that belongs to {weights}")
        vae = load_vae(vae_path if vae_path is not None else weights.parent / VAE_FOLDER)
        if vae.config.latent_channels != model.unet.config.in_channels:
            raise CheckpointError(f"the VAE has {vae.config.latent_channels} latent channels but the UNet reads "
                                  f"{model.unet.config.in_channels}; pass the Stable Diffusion 2.1-base VAE")
        # The LLM keeps the checkpoint's dtype (fp16 officially); bridge, UNet and VAE run in fp32
        # as in the official code, unless a dtype is forced.
        # (nn.Module.to directly: diffusers' override warns on every dtype cast, even a harmless one)
        # ``quant`` (int8/int4) applies to the text encoder only: the UNet's linears see hundreds of
        # rows per call, where weight-only kernels are no faster than fp32 matmuls
        place(model.llm, device, dtype or (torch.float32 if quant else None), quant)
        for part in (model.bridge, model.unet, vae):
            nn.Module.to(part, device=device, dtype=dtype or torch.float32)
        if device_map is not None:
            model = dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
        self.model, self.vae, self.config = model.eval(), vae.eval(), config
        self.device = torch.device(device)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.progress_bar = progress_bar
        self.quant = quant
        self.memory = self._apply_memory_options(memory if memory is not None else MemoryOptions())
        trained = model.unet.config.sample_size * self.vae_scale_factor
        self.default_size = (self.defaults.height or trained, self.defaults.width or trained)  # (height, width)

    def _apply_memory_options(self, memory: MemoryOptions) -> MemoryOptions:
        if not isinstance(memory, MemoryOptions):
            raise TypeError(f"memory must be a MemoryOptions, got {type(memory).__name__}")
        if memory.attention_slicing is not None:
            self.model.unet.set_attention_slice(memory.attention_slicing)
        if memory.vae_slicing:
            self.vae.enable_slicing()
        if memory.vae_tiling:
            self.vae.enable_tiling()
        return memory

    # -- steps -------------------------------------------------------------------------------

    def _tokens(self, text: str, what: str):
        if not isinstance(text, str):
            raise TypeError(f"the {what} must be a string, got {type(text).__name__}")
        converted = convert_data_to_id(self.tokenizer, {"caption": CPMBeeTokenizer.escape(text), "objects": ""})
        if len(converted.input_ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the {what} is {len(converted.input_ids)} tokens but the limit is {MAX_PROMPT_TOKENS}; "
                             "shorten it")
        return converted

    def prompt_inputs(self, prompt: str, negative_prompt: str | None = None, guidance: bool = True) -> CPMBeeInputs:
        """The padded CPM-Bee batch ``[negative; prompt]`` (``[prompt]`` without guidance). Both rows
        are padded to the longer one, as officially: the padding rows reach the UNet."""
        rows = [self._tokens(prompt, "prompt")]
        if guidance:
            rows.insert(0, self._tokens(negative_prompt or "", "negative prompt"))
        return collate_for_forward(rows, self.tokenizer).to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, guidance: bool = True) -> torch.Tensor:
        """UNet conditioning (2 or 1, L, d_cross): the negative (or empty) prompt first."""
        return self.model.encode_prompt(self.prompt_inputs(prompt, negative_prompt, guidance))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) -> float32 images (B, H, W, 3) in [0, 1]."""
        # multiply by 1/scaling_factor: the official form (dividing differs in the last bit)
        image = self.vae.decode(latents.to(self.vae.dtype) * (1 / self.vae.config.scaling_factor)).sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

    def _check(self, height: int, width: int, steps: int, guidance_scale: float, n: int) -> None:
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE's downscaling factor), "
                                 f"got {value}")
        train_steps = self.config.scheduler.get("num_train_timesteps", 1000)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_steps:
            raise ValueError(f"num_inference_steps must be an integer from 1 to {train_steps}, got {steps}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n}")
        check_guidance_scale(guidance_scale)
        native_height, native_width = self.default_size
        if not (0.5 <= height / native_height <= 2 and 0.5 <= width / native_width <= 2):
            logger.warning("painting %dx%d with a model trained at %dx%d: far from its own size this is slow and "
                           "the picture usually breaks; leave the size out to use the model's", width, height,
                           native_width, native_height)

    def _switch(self, name: str, value):
        """The checker or ranker for one call: None = as built; False = off; True = as built, or
        the default when it was built off; a callable (or a VisCPMChat for the ranker) = that."""
        built = {"prompt_safety_checker": self.prompt_safety_checker, "image_safety_checker": self.image_safety_checker,
                 "add_ranker": self.ranker}[name]
        if value is None or (value is True and built is not None):
            return built
        if value is True:  # built off, on for this call: the default, loaded once
            if name not in self._bundled:
                self._bundled[name] = (load_ranker(True, chat=self._default_chat) if name == "add_ranker"
                                       else SWITCH_LOADERS[name](True))
            return self._bundled[name]
        if value is False or callable(value) or (name == "add_ranker" and isinstance(value, VisCPMChat)):
            return SWITCH_LOADERS[name](value)
        raise ValueError(f"{name}: per call, pass true or false (or, from Python, a callable); load checkers and "
                         f"rankers from folders when building the painter, got {value!r}")

    @torch.no_grad()
    def _paint_one(self, prompt, negative_prompt, n, guidance_scale, steps, height, width, scheduler,
                   generator, latents, callback, edit: EditSource | None = None) -> list[Image.Image]:
        # 2. encode: [negative; prompt] under guidance, each repeated n times -> (2n or n, L, d)
        guided = guidance_scale > 1
        states = self.encode_prompt(prompt, negative_prompt, guided)
        states = states.repeat_interleave(n, dim=0)

        # 3. latents: drawn from the generator (before any step noise, as officially) or given; an
        #    edit starts from its image, noised to the strength's first timestep
        scheduler.set_timesteps(steps, device=self.device)
        unet = self.model.unet
        shape = (n, unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)} for this call, got {list(latents.shape)}")
        noise = latents.to(self.device, unet.dtype)
        timesteps = scheduler.timesteps if edit is None else edit.timesteps(scheduler, steps)
        latents = noise * scheduler.init_noise_sigma if edit is None else edit.start(scheduler, noise, timesteps)

        # 4. denoise; under guidance the UNet reads [uncond; cond] and the prediction is
        #    u + g (c - u); inpainting puts the image back outside the mask after each step
        for i, t in enumerate(tqdm(timesteps, desc="painting", disable=not self.progress_bar)):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            output = unet(model_input, t, encoder_hidden_states=states).sample
            if guided:
                uncond, cond = output.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            else:
                noise_pred = output
            new_latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
            if edit is not None:
                new_latents = edit.blend(scheduler, new_latents, noise, timesteps, i)
            if callback is not None:
                callback(PaintStep(i, int(t), len(timesteps), latents, model_input, output, noise_pred, new_latents))
            latents = new_latents

        # 5. decode, 6. postprocess: float [0, 1] NHWC -> uint8 with numpy's round-half-even
        pixels = (self.decode_latents(latents) * 255).round().astype(np.uint8)
        return [Image.fromarray(p) for p in pixels]

    # -- public API --------------------------------------------------------------------------

    def paint(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | SchedulerMixin | None = None,
        preset: str = "official",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[PaintStep], None] | None = None,
        prompt_safety_checker: bool | PromptChecker | None = None,
        image_safety_checker: bool | ImageChecker | None = None,
        add_ranker: bool | Ranker | None = None,
        num_candidates: int = RANKER_CANDIDATES,
        image: str | os.PathLike | Image.Image | None = None,
        mask_image: str | os.PathLike | Image.Image | None = None,
        strength: float | None = None,
    ) -> list[PaintedImage]:
        """Paint ``num_images_per_prompt`` images for each prompt. With a ranker, each returned
        image is the best of ``num_candidates``. ``latents``: (N, C, h, w) initial noise,
        N = prompts × images × candidates.

        ``preset`` picks the scheduler and step count: "official" (DDPM, 50 steps) or "fast"
        (SDE-DPM-Solver++, 20 steps); an explicit ``scheduler`` or ``num_inference_steps`` overrides it.
        ``guidance_scale`` defaults to the model's (:class:`PaintDefaults`; officially 7.5).

        The three switches override the painter's for this call: None keeps it, False turns it
        off, True turns it on (the painter's, or the default), a callable replaces it. A flagged
        prompt raises :class:`RefusedPrompt` before anything is painted.

        ``height``/``width`` default to the model's own resolution (:attr:`default_size`).

        ``image``: paint image-to-image from it (resized to ``height`` × ``width``); ``strength``
        (default 0.8) is how much of the schedule repaints it, 0 keeps it, 1 ignores it.
        ``mask_image`` (same size as ``image``; white = repaint, black = keep): inpaint, at
        strength 1 by default. Both follow diffusers' conventions (:mod:`viscpm.pipelines.edit`).

        Seeds: image k of the call gets its own generator seeded ``seed + k`` (``seed`` drawn at
        random when not given), so any image can be painted again alone: ``seed=result.seed`` with
        the same settings gives the same image. With a ranker, an image's candidates are painted
        with :func:`candidate_seed` ``(seed + k, j)``; the chosen candidate's own seed is in
        ``metadata["ranker"]`` (it repaints that candidate with ranking off). A ``generator`` instead
        is shared by all images in order, as the official code does."""
        # 1. check inputs
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts")
        scheduler, num_inference_steps = sampling_preset(preset, scheduler, num_inference_steps)
        guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        height, width = self.default_size[0] if height is None else height, self.default_size[1] if width is None else width
        self._check(height, width, num_inference_steps, guidance_scale, num_images_per_prompt)
        if guidance_scale < 1:
            logger.warning("guidance_scale %s < 1 turns classifier-free guidance off (as in diffusers)", guidance_scale)
        if guidance_scale <= 1 and any(negatives):
            logger.warning("the negative prompt is ignored without classifier-free guidance (guidance_scale <= 1)")
        prompt_checker = self._switch("prompt_safety_checker", prompt_safety_checker)
        image_checker = self._switch("image_safety_checker", image_safety_checker)
        ranker = self._switch("add_ranker", add_ranker)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive integer, got {num_candidates}")
        for what, texts in (("prompt", prompts), ("negative prompt", [n for n in negatives if n is not None])):
            for text in texts:  # checked here too, before any safety checker reads them
                if not isinstance(text, str):
                    raise TypeError(f"the {what} must be a string, got {type(text).__name__}")
        if prompt_checker is not None:
            for text in prompts:
                result = verdict(prompt_checker(text), "prompt safety checker")
                if result:
                    shown = text if len(text) <= 80 else text[:77] + "..."
                    raise RefusedPrompt(f"the prompt {shown!r} was refused: {result.reason}; nothing was painted",
                                        result.reason, result.checker)
        if image is None and (mask_image is not None or strength is not None):
            raise ValueError("mask_image and strength edit an image: pass image= too (the picture to start from)")
        edit = None if image is None else prepare_edit(self.vae, self.vae_scale_factor, image, mask_image, strength,
                                                       height, width)
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is None and generator is None:
            seed = secrets.randbelow(2**32)
        if isinstance(scheduler, str):
            name, scheduler = scheduler, build_scheduler(scheduler, self.config.scheduler)
        else:
            name = type(scheduler).__name__
        candidates = num_candidates if ranker is not None else 1
        n = num_images_per_prompt
        per_prompt = n * candidates
        if latents is not None and latents.size(0) != per_prompt * len(prompts):
            raise ValueError(f"latents hold {latents.size(0)} images but this call paints "
                             f"{per_prompt * len(prompts)} ({len(prompts)} prompts × {per_prompt})")

        results = []
        # One prompt at a time: each keeps its own official padding, which the UNet attends to.
        for p, (text, negative) in enumerate(zip(prompts, negatives)):
            start = latents[p * per_prompt : (p + 1) * per_prompt] if latents is not None else None
            image_seeds = [seed + p * n + k for k in range(n)] if seed is not None else [None] * n
            seeds = [candidate_seed(s, j) if s is not None else None for s in image_seeds for j in range(candidates)]
            generators = generator if generator is not None else [torch.Generator("cpu").manual_seed(s) for s in seeds]
            images = self._paint_one(text, negative, per_prompt, guidance_scale, num_inference_steps,
                                     height, width, scheduler, generators, start, callback, edit)
            # 7. safety: flagged images become black and are reported
            images, checks = screen_images(image_checker, images)
            flagged = [bool(c) for c in checks]
            if any(flagged):
                logger.warning("the image safety checker flagged %d of %d images (%s); they are returned black",
                               sum(flagged), len(flagged), "; ".join(dict.fromkeys(c.reason for c in checks if c)))
            scores: list[float | None] = [None] * len(images)
            keep = list(range(len(images)))
            metadata = [{"height": height, "width": width} | ({"edit": edit_metadata(edit)} if edit else {})
                        for _ in images]
            if ranker is not None:  # 8. rank: the best unflagged candidate of each group
                scores = [float(s) for s in ranker(text, images)]
                keep = [max(range(g, g + candidates), key=lambda i: (not flagged[i], scores[i]))
                        for g in range(0, len(images), candidates)]
                for g, i in zip(range(0, len(images), candidates), keep):
                    metadata[i]["ranker"] = {"name": getattr(ranker, "name", type(ranker).__name__),
                                             "chosen": i - g,
                                             "candidate_seeds": seeds[g : g + candidates],
                                             "candidate_scores": scores[g : g + candidates]}
            results += [PaintedImage(images[i], text, negative, image_seeds[k], num_inference_steps, name,
                                     guidance_scale, flagged[i], scores[i], metadata[i], checks[i].reason or None)
                        for k, i in enumerate(keep)]
        return results

    __call__ = paint

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        image_size: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_inference_steps: int = 50,
    ) -> Image.Image:
        """The official call: DDPM, ``image_size`` square, one PIL image holding all results as a grid.
        ``guidance_scale`` and ``image_size`` default to the model's (officially 7.5 and 512)."""
        height, width = (image_size, image_size) if image_size is not None else self.default_size
        results = self.paint(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                             guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                             height=height, width=width, generator=generator, latents=latents)
        return grid_image([r.image for r in results])

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        max_shard_size: int | str | None = None) -> Path:
        """Write config.json + weights + vocab.txt + vae/ + generation_config.json (loadable with
        ``VisCPMPaint(folder)``); big models in shards of ``max_shard_size`` (e.g. "2GB"), floats
        cast to ``dtype`` on the way."""
        refuse_quantized(self.quant)
        folder = save_folder(self.model, self.config, folder, self.vocab_path, dtype=dtype, max_shard_size=max_shard_size)
        self.vae.save_pretrained(folder / VAE_FOLDER)
        height, width = self.default_size  # stated, so the folder says its resolution whatever its UNet
        replace(self.defaults, height=height, width=width).save(folder)
        return folder
