"""VisCPMPaint: paint from Chinese or English prompts. A thin pipeline with no model math; the
steps of :meth:`VisCPMPaint.paint`: check inputs → encode prompt and negative → prepare latents →
denoise with guidance → decode → postprocess → safety → rank.

The seed API matches the official one, so VisCPM users can switch::

    painter = VisCPMPaint("viscpm_paint_zhplus_checkpoint.pt")   # vocab.txt, vae/ beside it
    image = painter.generate("海上生明月，天涯共此时")              # one PIL image (a grid)

Beyond it, ``painter.paint(...)`` (also ``painter(...)``) returns one :class:`PaintedImage` per
image with its settings; it paints image-to-image (``image=``) and inpaints (``mask_image=``, see
:mod:`viscpm.pipelines.edit`). Its advanced options are :class:`PaintOptions`; schedulers, presets
and defaults live in :mod:`viscpm.pipelines.defaults`, loading in :mod:`viscpm.pipelines.loading`.
Safety checkers refuse a flagged prompt (:class:`RefusedPrompt`) and blacken flagged images; a
ranker keeps the best of ``num_candidates`` images (:mod:`viscpm.safety`, :mod:`viscpm.rerank`).

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

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import VAE_FOLDER, save_folder
from ..models.cpmbee import CPMBeeInputs
from ..models.paint import PaintModel
from ..placement import dispatch, place
from ..prompt import collate_for_forward, convert_data_to_id
from ..quantization import refuse_quantized
from ..rerank import Ranker, load_ranker
from ..safety import ImageChecker, PromptChecker, load_image_checker, load_prompt_checker, screen_images, verdict
from ..tokenization import CPMBeeTokenizer
from .chat import VisCPMChat
from .defaults import (
    RANKER_CANDIDATES, SAMPLING_PRESETS, SCHEDULERS, MemoryOptions, build_scheduler, check_guidance_scale,
    default_model_path, has_default_model, is_packaged, sampling_preset,
)
from .edit import EditSource, edit_metadata, prepare_edit
from .loading import PaintDefaults, check_vae, check_vocab, load_paint
from .paint_types import PaintedImage, PaintOptions, PaintStep, RefusedPrompt, grid_image
from .switches import resolve_switch

__all__ = [  # the defaults and loading names are re-exported: this is where painting's names were always found
    "MAX_PROMPT_TOKENS", "RANKER_CANDIDATES", "SAMPLING_PRESETS", "SCHEDULERS", "MemoryOptions", "PaintDefaults",
    "PaintOptions", "PaintStep", "PaintedImage", "RefusedPrompt", "VisCPMPaint", "build_scheduler", "candidate_seed",
    "grid_image", "sampling_preset",
]

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 3000  # CPM-Bee's input limit in VisCPM (max_inp_length); longer is refused


def candidate_seed(seed: int, index: int) -> int:
    """The seed of ranking candidate ``index`` of the image seeded ``seed``: the seed itself first
    (so ranking off paints candidate 0), then seeds drawn from ``(seed, index)``, which no other
    image's ``seed + k`` reaches in practice. Candidates depend on the image's seed only, so the
    seed reported for an image repaints it alone with the same settings, ranking included."""
    if index == 0:
        return seed
    drawn = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(drawn) >> 1  # 63 bits: any torch.Generator accepts it


@dataclass(frozen=True)
class _Plan:
    """One call's settings, checked and resolved (step 1 of :meth:`VisCPMPaint.paint`)."""

    prompts: list[str]
    negatives: list[str | None]
    num_images: int  # per prompt
    candidates: int  # per image: 1 without a ranker
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: SchedulerMixin
    scheduler_name: str
    seed: int | None
    options: PaintOptions
    edit: EditSource | None
    image_checker: ImageChecker | None
    ranker: Ranker | None

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    @property
    def per_prompt(self) -> int:
        return self.num_images * self.candidates


def _ranking_chat(model_path: str | os.PathLike | None = None) -> VisCPMChat:
    """A chat model to self-rerank with, the packaged one by default (candidates pass Paint's checker)."""
    return VisCPMChat(model_path, image_safety_checker=False)


class VisCPMPaint:
    """Text to image. ``model_path``: an official ``.pt``, our saved folder, or None for the model
    shipped with the package (loaded in fp32 unless ``dtype`` says otherwise).

    ``prompt_safety_checker``, ``image_safety_checker``, ``add_ranker``: a name, a folder, a bool,
    None (the default) or a callable, resolved here once (the tables: :mod:`viscpm.safety`,
    :mod:`viscpm.rerank`; None self-reranks only with the packaged models); a call switches them
    with ``True``/``False``/a callable (:mod:`viscpm.pipelines.switches`).

    ``quant``: ``"int8"``/``"int4"`` quantization of the CPM-Bee text encoder (see :mod:`viscpm.quantization`).

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
        packaged = is_packaged("paint", model_path)
        packaged_chat = _ranking_chat if packaged and has_default_model("chat") else None
        prompt_checker = load_prompt_checker(prompt_safety_checker)
        image_checker = load_image_checker(image_safety_checker)
        ranker = load_ranker(add_ranker, chat=packaged_chat, open_chat=_ranking_chat)
        if packaged:
            model_path, dtype = default_model_path("paint"), dtype or torch.float32
        on_cpu = torch.device(device).type == "cpu"  # CPU: quantized while loading; CUDA: by bitsandbytes
        parts = load_paint(model_path, config_path, vocab_path, vae_path, quant=quant if on_cpu else None)
        # The LLM keeps the checkpoint's dtype (fp16 officially); bridge, UNet and VAE run in fp32
        # as in the official code, unless a dtype is forced.
        # (nn.Module.to directly: diffusers' override warns on every dtype cast, even a harmless one)
        # ``quant`` (int8/int4) applies to the text encoder only: the UNet's linears see hundreds of
        # rows per call, where weight-only kernels are no faster than fp32 matmuls
        model = parts.model
        place(model.llm, device, dtype or (torch.float32 if quant else None), quant)
        for part in (model.bridge, model.unet, parts.vae):
            nn.Module.to(part, device=device, dtype=dtype or torch.float32)
        if device_map is not None:
            model = dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
        self._setup(model, parts.vae, parts.tokenizer, parts.defaults, device, prompt_checker, image_checker, ranker,
                    packaged_chat, progress_bar, memory, quant)

    @classmethod
    def from_components(
        cls,
        model: PaintModel,
        vae: nn.Module,
        tokenizer: CPMBeeTokenizer,
        *,
        defaults: PaintDefaults | None = None,
        prompt_safety_checker: PromptChecker | None = None,
        image_safety_checker: ImageChecker | None = None,
        ranker: Ranker | None = None,
        device: str | torch.device | None = None,
        progress_bar: bool = True,
        memory: MemoryOptions | None = None,
        quant: str | None = None,
    ) -> VisCPMPaint:
        """A painter over components you already hold (e.g. from
        :func:`viscpm.pipelines.loading.load_paint`, or built in a test), as diffusers' pipelines take
        theirs. They are used as given: no checker or ranker unless one is passed; ``device`` (where
        latents live) defaults to the VAE's; ``quant``: how the text encoder was quantized, if it was."""
        check_vocab(tokenizer, model)
        check_vae(vae, model)
        painter = cls.__new__(cls)
        device = device if device is not None else next(vae.parameters()).device
        painter._setup(model, vae, tokenizer, defaults or PaintDefaults(), device, prompt_safety_checker,
                       image_safety_checker, ranker, None, progress_bar, memory, quant)
        return painter

    def _setup(self, model: PaintModel, vae: nn.Module, tokenizer: CPMBeeTokenizer, defaults: PaintDefaults,
               device: str | torch.device, prompt_checker: PromptChecker | None, image_checker: ImageChecker | None,
               ranker: Ranker | None, default_chat: Callable[[], VisCPMChat] | None, progress_bar: bool,
               memory: MemoryOptions | None, quant: str | None) -> None:
        self.model, self.vae, self.config = model.eval(), vae.eval(), model.config
        self.tokenizer, self.vocab_path, self.defaults = tokenizer, tokenizer.vocab_path, defaults
        self.device = torch.device(device)
        self.prompt_safety_checker, self.image_safety_checker, self.ranker = prompt_checker, image_checker, ranker
        self._switch_defaults = {  # what a call's True turns on when the painter was built without one
            "prompt_safety_checker": cache(lambda: load_prompt_checker(True)),
            "image_safety_checker": cache(lambda: load_image_checker(True)),
            "add_ranker": cache(lambda: load_ranker(True, chat=default_chat)),
        }
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.progress_bar, self.quant = progress_bar, quant
        self.memory = memory if memory is not None else MemoryOptions()
        if not isinstance(self.memory, MemoryOptions):
            raise TypeError(f"memory must be a MemoryOptions, got {type(self.memory).__name__}")
        self.memory.apply(model.unet, vae)
        trained = model.unet.config.sample_size * self.vae_scale_factor
        self.default_size = (defaults.height or trained, defaults.width or trained)  # (height, width)

    # -- the parts of a call -----------------------------------------------------------------

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

    def _plan(self, prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale, height,
              width, seed, image, mask_image, strength, options: PaintOptions) -> _Plan:
        """Check a call's inputs and resolve its defaults and switches; refuses a flagged prompt."""
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(negatives)} negative prompts")
        scheduler, steps = sampling_preset(options.preset, options.scheduler, num_inference_steps)
        guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        height, width = self.default_size[0] if height is None else height, self.default_size[1] if width is None else width
        self._check(height, width, steps, guidance_scale, num_images_per_prompt)
        if guidance_scale < 1:
            logger.warning("guidance_scale %s < 1 turns classifier-free guidance off (as in diffusers)", guidance_scale)
        if guidance_scale <= 1 and any(negatives):
            logger.warning("the negative prompt is ignored without classifier-free guidance (guidance_scale <= 1)")
        prompt_checker, image_checker, ranker = (
            resolve_switch(name, getattr(options, name), built, self._switch_defaults[name])
            for name, built in (("prompt_safety_checker", self.prompt_safety_checker),
                                ("image_safety_checker", self.image_safety_checker), ("add_ranker", self.ranker)))
        for what, texts in (("prompt", prompts), ("negative prompt", [n for n in negatives if n is not None])):
            for text in texts:  # checked here too, before any safety checker reads them
                if not isinstance(text, str):
                    raise TypeError(f"the {what} must be a string, got {type(text).__name__}")
        for text in prompts if prompt_checker is not None else ():
            result = verdict(prompt_checker(text), "prompt safety checker")
            if result:
                shown = text if len(text) <= 80 else text[:77] + "..."
                raise RefusedPrompt(f"the prompt {shown!r} was refused: {result.reason}; nothing was painted",
                                    result.reason, result.checker)
        if image is None and (mask_image is not None or strength is not None):
            raise ValueError("mask_image and strength edit an image: pass image= too (the picture to start from)")
        edit = None if image is None else prepare_edit(self.vae, self.vae_scale_factor, image, mask_image, strength,
                                                       height, width)
        if seed is not None and options.generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is None and options.generator is None:
            seed = secrets.randbelow(2**32)
        if isinstance(scheduler, str):
            name, scheduler = scheduler, build_scheduler(scheduler, self.config.scheduler)
        else:
            name = type(scheduler).__name__
        plan = _Plan(prompts, negatives, num_images_per_prompt, options.num_candidates if ranker is not None else 1,
                     steps, guidance_scale, height, width, scheduler, name, seed, options, edit, image_checker, ranker)
        latents = options.latents
        if latents is not None and latents.size(0) != plan.per_prompt * len(prompts):
            raise ValueError(f"latents hold {latents.size(0)} images but this call paints "
                             f"{plan.per_prompt * len(prompts)} ({len(prompts)} prompts × {plan.per_prompt})")
        return plan

    def _prepare_latents(self, plan: _Plan, generator, latents: torch.Tensor | None):
        """(first latents, the noise they came from, the timesteps to run)."""
        plan.scheduler.set_timesteps(plan.steps, device=self.device)
        unet = self.model.unet
        shape = (plan.per_prompt, unet.config.in_channels, plan.height // self.vae_scale_factor,
                 plan.width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)} for this call, got {list(latents.shape)}")
        noise = latents.to(self.device, unet.dtype)
        scheduler, edit = plan.scheduler, plan.edit
        timesteps = scheduler.timesteps if edit is None else edit.timesteps(scheduler, plan.steps)
        latents = noise * scheduler.init_noise_sigma if edit is None else edit.start(scheduler, noise, timesteps)
        return latents, noise, timesteps

    def _denoise(self, plan: _Plan, states: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, generator) -> torch.Tensor:
        """Under guidance the UNet reads [uncond; cond] and the prediction is u + g (c - u);
        inpainting puts the image back outside the mask after each step."""
        scheduler, unet, callback = plan.scheduler, self.model.unet, plan.options.callback
        for i, t in enumerate(tqdm(timesteps, desc="painting", disable=not self.progress_bar)):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if plan.guided else latents, t)
            output = unet(model_input, t, encoder_hidden_states=states).sample
            if plan.guided:
                uncond, cond = output.chunk(2)
                noise_pred = uncond + plan.guidance_scale * (cond - uncond)
            else:
                noise_pred = output
            new_latents = scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
            if plan.edit is not None:
                new_latents = plan.edit.blend(scheduler, new_latents, noise, timesteps, i)
            if callback is not None:
                callback(PaintStep(i, int(t), len(timesteps), latents, model_input, output, noise_pred, new_latents))
            latents = new_latents
        return latents

    def _rank(self, plan: _Plan, prompt: str, images: list[Image.Image], flagged: list[bool],
              seeds: list[int | None]) -> tuple[list[int], list[float | None], list[dict]]:
        """(the kept image of each candidate group, every score, every image's metadata)."""
        metadata = [{"height": plan.height, "width": plan.width} | ({"edit": edit_metadata(plan.edit)} if plan.edit else {})
                    for _ in images]
        if plan.ranker is None:
            return list(range(len(images))), [None] * len(images), metadata
        k = plan.candidates
        scores = [float(s) for s in plan.ranker(prompt, images)]
        keep = [max(range(g, g + k), key=lambda i: (not flagged[i], scores[i])) for g in range(0, len(images), k)]
        for g, i in zip(range(0, len(images), k), keep):
            metadata[i]["ranker"] = {"name": getattr(plan.ranker, "name", type(plan.ranker).__name__),
                                     "chosen": i - g, "candidate_seeds": seeds[g : g + k],
                                     "candidate_scores": scores[g : g + k]}
        return keep, scores, metadata

    # -- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def paint(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        mask_image: str | os.PathLike | Image.Image | None = None,
        strength: float | None = None,
        **options,
    ) -> list[PaintedImage]:
        """Paint ``num_images_per_prompt`` images for each prompt. ``options``: the advanced
        options, by the names of :class:`PaintOptions` (``scheduler``, ``preset``, ``generator``,
        ``latents``, ``callback``, the switches ``prompt_safety_checker``, ``image_safety_checker``,
        ``add_ranker``, and ``num_candidates``). A flagged prompt raises :class:`RefusedPrompt`
        before anything is painted.

        ``num_inference_steps`` defaults to the preset's (50, DDPM), ``guidance_scale`` to the
        model's (:class:`PaintDefaults`; officially 7.5), ``height``/``width`` to the model's own
        resolution (:attr:`default_size`).

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
        # 1. check inputs; resolve the defaults, the switches and the image to edit; check the prompts' safety
        plan = self._plan(prompt, negative_prompt, num_images_per_prompt, num_inference_steps, guidance_scale, height,
                          width, seed, image, mask_image, strength, PaintOptions.from_keywords(options))
        n, per_prompt, given = plan.num_images, plan.per_prompt, plan.options.latents
        results = []
        # One prompt at a time: each keeps its own official padding, which the UNet attends to.
        for p, (text, negative) in enumerate(zip(plan.prompts, plan.negatives)):
            image_seeds = [plan.seed + p * n + k for k in range(n)] if plan.seed is not None else [None] * n
            seeds = [candidate_seed(s, j) if s is not None else None for s in image_seeds for j in range(plan.candidates)]
            generator = plan.options.generator if plan.options.generator is not None else [torch.Generator("cpu").manual_seed(s) for s in seeds]
            # 2. encode: [negative; prompt] under guidance, each repeated per image -> (2N or N, L, d)
            states = self.encode_prompt(text, negative, plan.guided).repeat_interleave(per_prompt, dim=0)
            # 3. latents: drawn from the generator (before any step noise, as officially) or given; an
            #    edit starts from its image, noised to the strength's first timestep
            start = given[p * per_prompt : (p + 1) * per_prompt] if given is not None else None
            latents, noise, timesteps = self._prepare_latents(plan, generator, start)
            # 4. denoise
            latents = self._denoise(plan, states, latents, noise, timesteps, generator)
            # 5. decode, 6. postprocess: float [0, 1] NHWC -> uint8 with numpy's round-half-even
            pixels = (self.decode_latents(latents) * 255).round().astype(np.uint8)
            images = [Image.fromarray(picture) for picture in pixels]
            # 7. safety: flagged images become black and are reported
            images, checks = screen_images(plan.image_checker, images)
            flagged = [bool(c) for c in checks]
            if any(flagged):
                logger.warning("the image safety checker flagged %d of %d images (%s); they are returned black",
                               sum(flagged), len(flagged), "; ".join(dict.fromkeys(c.reason for c in checks if c)))
            # 8. rank: the best unflagged candidate of each group
            keep, scores, metadata = self._rank(plan, text, images, flagged, seeds)
            results += [PaintedImage(images[i], text, negative, image_seeds[k], plan.steps, plan.scheduler_name,
                                     plan.guidance_scale, flagged[i], scores[i], metadata[i], checks[i].reason or None)
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
