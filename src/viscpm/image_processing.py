"""Loading user images safely and turning them into ``pixel_values`` for the vision encoder.

``load_image`` accepts a path or a PIL image of any mode and returns an RGB image, raising
``ImageError`` (a ``ValueError``) with a clear message for anything it cannot use. Files are opened
as PNG, JPEG, WebP or GIF only (``open_image``); a PIL image a caller opened is taken as it is. ``ImageTransform``
is the official VisCPM-Chat eval transform (SPEC.md §4): PIL bicubic resize to a square, scale to
[0, 1], normalise with mean 0.5 / std 0.5.

Mode handling, and why:
* Transparent images (RGBA, LA, PA, P or L/RGB with a transparency key, premultiplied RGBa/La) are
  composited onto a white background, which is what an image viewer or a web page shows and what
  the transformers ``convert_to_rgb`` helpers (Idefics, Idefics2, ...) do. Plain ``.convert("RGB")``,
  which the official VisCPM and LLaVA use, drops the alpha channel and exposes whatever colour the
  fully transparent pixels happen to store -- usually black, so dark text or line art on a
  transparent background vanishes. Pass ``background=None`` to get that official behaviour.
* 16-bit greyscale (``I;16*``) is scaled over its full range (0..65535 -> 0..255, rounded). PIL's own
  ``convert("L")`` clips it at 255 instead, which turns most 16-bit images white.
* ``I`` (32-bit int) and ``F`` (float) carry no nominal range, so the smallest conventional range
  that holds the data is used: 0..1 (float only), 0..255, 0..65535; data outside all of these is
  stretched from its minimum to its maximum.
* Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``) goes through PIL's
  ``convert("RGB")``.
* EXIF orientation is not applied, matching the official code.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image]

# 64 megapixels: a 8000x8000 photo fits; decoding it needs ~200 MB as RGB. Checked before decoding.
DEFAULT_MAX_PIXELS = 64_000_000
# The only formats PIL may open for us. Anything else it can read is refused before it is parsed:
# EPS would run Ghostscript on the file, and rarely used decoders are where parser bugs live.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
ALLOWED_FORMATS_TEXT = "PNG, JPEG, WebP or GIF"
WHITE = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_UINT16_MAX = 65535


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says which one and why."""


# ------------------------------------------------------------------------------------------------
# Loading


def load_image(
    image: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = WHITE,
) -> Image.Image:
    """Open ``image`` (a path or a PIL image of any mode) and return it as a decoded RGB image.

    ``max_pixels`` bounds width x height and is checked from the file header, before the pixels are
    decoded. ``background`` is the colour transparent pixels are composited onto; ``None`` drops
    the alpha channel like the official ``.convert("RGB")``. An RGB PIL input is returned as is.
    Raises ``ImageError`` for a missing, empty, corrupt, truncated, non-image, zero-size or
    oversized input.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(_checked(image, "the given PIL image", max_pixels), background)
    if not isinstance(image, (str, os.PathLike)):
        raise ImageError(f"expected an image path or a PIL.Image.Image, got {type(image).__name__}")

    path = Path(image)
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    with open_image(path) as opened:
        # Converting always makes a new image, so it stays valid after the file is closed.
        return _to_rgb(_checked(opened, str(path), max_pixels), background, always_copy=True)


def open_image(source: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """``Image.open`` limited to ``ALLOWED_FORMATS``: a file of any other format, whatever its name
    or MIME type says, raises ``ImageError`` before PIL parses it. Lazy: the pixels are decoded by
    ``load_image``, after its size check. ``name`` is how errors refer to ``source``."""
    name = name or str(source)
    # PIL warns (above Image.MAX_IMAGE_PIXELS) or raises (above twice that) about decompression
    # bombs while reading the header. The warning is silenced because our own max_pixels check
    # follows; the error becomes an ImageError.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"image {name} is too large to open: {error} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"not a readable image (corrupt, or not one of the formats read here: {ALLOWED_FORMATS_TEXT}): {name}"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"cannot read image {name}: {error}") from error


def _checked(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Check the size from the header, then decode the pixels."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,}; downscale it or pass a larger max_pixels"
        )
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise ImageError(f"{name} is corrupt or truncated: {error}") from error
    return image


# ------------------------------------------------------------------------------------------------
# Mode conversion


def _to_rgb(
    image: Image.Image, background: tuple[int, int, int] | None, always_copy: bool = False
) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy() if always_copy else image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_grey(image).convert("RGB")
    if mode == "La":  # premultiplied; PIL converts it to little else than LA
        image = image.convert("LA")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if background is None:  # the official behaviour: drop alpha, keep the stored colours
            return rgba.convert("RGB")
        backdrop = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # a mode PIL has no RGB conversion for
        raise ImageError(f"cannot convert an image of mode {mode!r} to RGB: {error}") from error


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit ``L`` (see the module docstring)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        low, high = 0.0, float(_UINT16_MAX)
    else:
        if not np.isfinite(values).all():
            raise ImageError(f"image of mode {image.mode!r} contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low >= 0:
            tops = (1.0, 255.0, float(_UINT16_MAX)) if image.mode == "F" else (255.0, float(_UINT16_MAX))
            fitting = [top for top in tops if high <= top]
            if fitting:
                low, high = 0.0, fitting[0]
        if high == low:  # a constant image outside every conventional range
            high = low + 1.0
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


# ------------------------------------------------------------------------------------------------
# Eval transform


@dataclass(frozen=True)
class ImageTransform:
    """The official eval transform: ``images -> pixel_values`` ``[B, 3, image_size, image_size]`` float32.

    Each image goes through ``load_image`` (a no-op for an RGB PIL image), then PIL's bicubic resize
    to ``(image_size, image_size)`` (aspect ratio not kept, as in the official code), then
    ``x / 255``, then ``(x - mean) / std``. The arithmetic follows torchvision's ToTensor/Normalize
    op for op, so the result is bit-identical to the official transform.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise ValueError("ImageTransform needs at least one image")
        return torch.stack([self._one(image) for image in images])  # (B, 3, S, S)

    def _one(self, image: ImageInput) -> torch.Tensor:
        image = load_image(image)
        resized = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = np.array(resized, dtype=np.uint8)  # (S, S, 3), a writable copy
        x = torch.from_numpy(array).permute(2, 0, 1).float().div(255)  # (3, S, S) in [0, 1]
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return (x - mean) / std
