"""Image-to-image and inpainting for VisCPMPaint: the source image's latents, the mask on the latent
grid, and the three places the denoising loop differs from text-to-image. diffusers' conventions
(``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline`` for a 4-channel UNet):

* ``strength`` in [0, 1] keeps the last ``int(steps × strength)`` timesteps of the schedule; the
  image's latents are noised to the first kept one with ``scheduler.add_noise``. At strength 1 the
  start is pure noise (as diffusers' inpainting does), so it equals text-to-image from the same
  noise; at strength 0 nothing is denoised and the image comes back through the VAE alone.
* inpainting (``mask_image``, white = repaint) blends after every step: outside the mask the latents
  are the image's own, re-noised to the next timestep, so the unmasked region ends as the image's
  exact latents and its pixels differ from the image by the VAE's reconstruction error only.

Two choices differ from diffusers, both for exactness: the image is encoded to the VAE posterior's
mode (diffusers samples it, drawing from the caller's generator first), so strength 0 is an exact
round trip and strength 1 keeps the text-to-image seed; and the mask reaches the latent grid by max
pooling (a cell repaints when any of its pixels does), where diffusers' nearest-neighbour resize can
drop a thin masked region from the coarser grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..image_processing import DEFAULT_MAX_PIXELS, ImageInput, load_image

DEFAULT_STRENGTH = 0.8  # image-to-image, as diffusers; inpainting repaints the mask fully (1.0)
BLACK = (0, 0, 0)


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number from 0 (keep the image) to 1 (repaint it all), got {strength!r}")
    return float(strength)


@dataclass(frozen=True)
class EditSource:
    """What an image-to-image or inpainting call starts from."""

    latents: torch.Tensor  # (1, C, h, w) the image's scaled VAE latents
    mask: torch.Tensor | None  # (1, 1, h, w), 1 = repaint; None: image-to-image
    strength: float

    def timesteps(self, scheduler: SchedulerMixin, steps: int) -> torch.Tensor:
        """The schedule's last ``int(steps × strength)`` steps (diffusers' ``get_timesteps``)."""
        start = (steps - min(int(steps * self.strength), steps)) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):  # schedulers that count steps start counting here
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def start(self, scheduler: SchedulerMixin, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The first latents: pure noise at strength 1, the image noised to the first timestep
        below it, the image itself when no step is left."""
        if self.strength == 1:
            return noise * scheduler.init_noise_sigma
        image = self.latents.to(noise.dtype).expand_as(noise)
        if len(timesteps) == 0:
            return image.clone()
        return scheduler.add_noise(image, noise, timesteps[:1].repeat(noise.size(0)))

    def blend(self, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, index: int) -> torch.Tensor:
        """After step ``index``: the image's latents (noised to the next timestep) outside the mask."""
        if self.mask is None:
            return latents
        known = self.latents.to(latents.dtype).expand_as(latents)
        if index + 1 < len(timesteps):
            known = scheduler.add_noise(known, noise, timesteps[index + 1 : index + 2].repeat(noise.size(0)))
        mask = self.mask.to(latents.dtype)
        return (1 - mask) * known + mask * latents


@torch.no_grad()
def prepare_edit(vae: AutoencoderKL, vae_scale_factor: int, image: ImageInput, mask_image: ImageInput | None,
                 strength: float | None, height: int, width: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> EditSource:
    """Load and check the image (and mask), resize them to ``height`` × ``width`` and encode."""
    strength = check_strength((1.0 if mask_image is not None else DEFAULT_STRENGTH) if strength is None else strength)
    picture = load_image(image, max_pixels=max_pixels)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    pixels = processor.preprocess(picture, height=height, width=width).to(vae.device, vae.dtype)  # (1, 3, H, W)
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor  # (1, C, h, w)
    mask = None
    if mask_image is not None:
        drawn = load_image(mask_image, max_pixels=max_pixels, background=BLACK)  # transparent = keep
        if drawn.size != picture.size:
            raise ValueError(f"mask_image is {drawn.width}x{drawn.height} but the image is {picture.width}x"
                             f"{picture.height}; draw the mask at the image's own size (white = repaint)")
        mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True,
                                           do_convert_grayscale=True)
        full = mask_processor.preprocess(drawn, height=height, width=width)  # (1, 1, H, W) in {0, 1}
        mask = F.adaptive_max_pool2d(full, latents.shape[-2:]).to(latents.device)  # (1, 1, h, w)
        if not mask.any():
            raise ValueError("mask_image has no white pixel: nothing to repaint (white marks what to repaint)")
    return EditSource(latents, mask, strength)


def edit_metadata(source: EditSource) -> dict:
    """What a PaintedImage records about the edit."""
    info = {"mode": "inpaint" if source.mask is not None else "img2img", "strength": source.strength}
    if source.mask is not None:
        info["masked_share"] = round(float(source.mask.mean()), 4)
    return info

