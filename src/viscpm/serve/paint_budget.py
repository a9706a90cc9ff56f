"""What a paint request may ask of the loaded model, decided before it is queued.

* Size: each side at most ``MAX_SIZE_FACTOR`` times the model's own resolution (and the server's
  ``max_paint_side``). Far above its own size a model paints broken pictures, and UNet attention
  grows with the square of the pixel count: the packaged 64-pixel model asked for 1024 × 1024
  held both cores for minutes.
* Work: UNet calls × samples per call (images × ranking candidates × 2 under guidance) × latent
  pixels, priced by the seconds one UNet call was measured to take on this machine. A request whose
  UNet work alone is priced above 1.5 times the server's time limit is refused at once instead of
  running into a 504; a request that waited in the queue until too little of its time is left is
  not started.

The price is measured when the server starts (the fastest of two UNet calls at the model's own
size, after a warm-up call), scaled linearly with the pixel count, and replaced by the fastest
step real requests took at each size. Linear scaling under-prices sizes above the model's own (attention grows with the
square) and the estimate leaves out text encoding, VAE decoding and ranking, so it is meant as a
lower bound; timing noise can still put it above the real time (hence ``REFUSE_ABOVE``). What it
refuses cannot finish in time; what it lets through usually does, and a request that does not is
still stopped at the limit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..pipelines.defaults import DEFAULT_PRESET, RANKER_CANDIDATES, SAMPLING_PRESETS
from .errors import bad_request

MAX_SIZE_FACTOR = 2  # the largest side a request may ask, in multiples of the model's own
# Refuse only work priced above this many times the time limit: a price measured at a busy moment
# can run high (15 % above the real steps once, at a load average of 19 on 2 cores)
REFUSE_ABOVE = 1.5
CALIBRATION_TEXT_TOKENS = 32  # length of the dummy prompt states the calibration call reads


def native_size(paint) -> tuple[int, int]:
    """(height, width) the model was trained at: the pipeline's ``default_size`` when it states one,
    else the UNet's ``sample_size`` times the VAE's downscaling."""
    stated = getattr(paint, "default_size", None)
    if stated is not None:
        return int(stated[0]), int(stated[1])
    side = paint.model.unet.config.sample_size * paint.vae_scale_factor
    return side, side


def _seconds_per_call(unet, latent_side: int, batch: int, repeats: int = 2) -> float:
    """Seconds of one UNet call on ``batch`` latents of ``latent_side``²: the fastest of ``repeats``
    calls after a warm-up call (the fastest, so that a busy moment at start-up does not price every
    later request too high)."""
    config = unet.config
    parameter = next(unet.parameters())
    latents = torch.randn(batch, config.in_channels, latent_side, latent_side, dtype=parameter.dtype,
                          device=parameter.device)
    states = torch.randn(batch, CALIBRATION_TEXT_TOKENS, config.cross_attention_dim, dtype=parameter.dtype,
                         device=parameter.device)
    fastest = float("inf")
    with torch.no_grad():
        unet(latents, 500, encoder_hidden_states=states)
        for _ in range(repeats):
            start = time.perf_counter()
            unet(latents, 500, encoder_hidden_states=states)
            fastest = min(fastest, time.perf_counter() - start)
    return fastest


@dataclass
class PaintBudget:
    """Size limit and cost model of one paint pipeline (see the module docstring)."""

    native: tuple[int, int]  # (height, width) in pixels
    vae_scale_factor: int
    seconds_per_sample: float  # one UNet call on one latent at the native size
    observed: dict[tuple[int, int], float] = field(default_factory=dict)  # latent (h, w) -> s per sample-call

    @classmethod
    def measure(cls, paint) -> "PaintBudget":
        height, width = native_size(paint)
        factor = paint.vae_scale_factor
        batch = 2  # one image under guidance
        seconds = _seconds_per_call(paint.model.unet, max(1, max(height, width) // factor), batch)
        return cls((height, width), factor, seconds / batch)

    @property
    def max_side(self) -> int:
        return MAX_SIZE_FACTOR * max(self.native)

    def seconds(self, height: int, width: int, samples: int, steps: int) -> float:
        """Estimated seconds of the UNet work: ``steps`` calls on ``samples`` latents of this size."""
        latent = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        per_sample = self.observed.get(latent)
        if per_sample is None:  # linear in pixels: a lower bound, as attention grows faster
            native = max(self.native) // self.vae_scale_factor
            per_sample = self.seconds_per_sample * latent[0] * latent[1] / max(1, native * native)
        return per_sample * samples * steps

    def observe(self, latent_shape: tuple[int, ...], seconds: float) -> None:
        """Record that one UNet call on latents of ``latent_shape`` (B, C, h, w) took ``seconds``; the
        fastest per size is kept, so the estimate stays a lower bound."""
        batch, _, h, w = latent_shape
        self.observed[(h, w)] = min(seconds / batch, self.observed.get((h, w), float("inf")))


def check_request(budget: PaintBudget, paint, options: dict, extras: dict, timeout: float) -> float:
    """Refuse (ApiError 400) a size above the model's limit or UNet work that cannot finish within
    ``timeout``; returns the estimated seconds. ``options``/``extras``: what the server passes to
    ``paint.paint``."""
    height, width = options.get("height", budget.native[0]), options.get("width", budget.native[1])
    if max(height, width) > budget.max_side:
        raise bad_request(f"size {width}x{height} is above this model's limit of {budget.max_side} pixels a side "
                          f"({MAX_SIZE_FACTOR}x the {budget.native[1]}x{budget.native[0]} it paints at); ask for "
                          "a smaller size or leave it out", "invalid_size", "size")
    steps = options.get("num_inference_steps") or SAMPLING_PRESETS[options.get("preset", DEFAULT_PRESET)][1]
    defaults = getattr(paint, "defaults", None)
    guidance = options.get("guidance_scale", getattr(defaults, "guidance_scale", 7.5))
    ranked = extras.get("add_ranker")
    ranked = getattr(paint, "ranker", None) is not None if ranked is None else ranked
    n = options.get("num_images_per_prompt", 1)
    samples = n * (RANKER_CANDIDATES if ranked else 1) * (2 if guidance > 1 else 1)
    seconds = budget.seconds(height, width, samples, steps)
    if seconds > REFUSE_ABOVE * timeout:
        raise bad_request(
            f"this request needs {steps} UNet steps over {samples} latents of {width}x{height} ({n} image(s)"
            f"{f' x {RANKER_CANDIDATES} ranking candidates' if ranked else ''}{' x 2 for guidance' if guidance > 1 else ''}"
            f"), about {seconds:,.0f} s on this server, but it stops requests after {timeout:g} s; ask for "
            "fewer images or steps, or a smaller size", "exceeds_time_limit")
    return seconds
