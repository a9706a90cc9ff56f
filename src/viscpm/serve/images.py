"""Images in and out of the API: ``image_url`` parts -> checked RGB images; painted images -> PNG.

Accepted image URLs: ``data:`` URLs (``data:image/png;base64,...``) and bare base64. ``http(s)://``
only when the server enables remote images; ``file://`` and every other scheme never (a server
must not read its own disk on a client's behalf). Sizes are checked before anything is decoded:
the base64 length, the decoded bytes, then width x height from the image header, so a
decompression bomb is refused without being expanded.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..image_processing import ALLOWED_FORMATS_TEXT, ImageError, load_image, open_image
from .errors import ApiError, bad_request
from .settings import ServeSettings

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class DecodedImage:
    image: "Image.Image"  # RGB, decoded
    key: str  # sha256 of the encoded bytes: the vision-state cache key


def too_large(message: str) -> ApiError:
    return ApiError(413, message, "image_too_large")


def image_bytes(url: str, settings: ServeSettings) -> bytes:
    """The encoded image bytes behind an ``image_url``, with its scheme and size checked."""
    url = url.strip()
    if not url:
        raise bad_request("the image_url is empty; send a data URL such as data:image/png;base64,...",
                          "invalid_image_url")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme is None:  # bare base64 (it cannot contain ':')
        return _base64(url, settings)
    if scheme == "data":
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise bad_request("malformed data URL: no ',' before the data", "invalid_image_url")
        if header.lower().endswith(";base64"):
            return _base64(payload, settings)
        data = urllib.parse.unquote_to_bytes(payload)
        _check_bytes(len(data), settings)
        return data
    if scheme in REMOTE_SCHEMES:
        if not settings.allow_remote_images:
            raise bad_request(
                "remote image URLs are off on this server; send the image inline as a data URL "
                "(data:image/png;base64,...) or start the server with --allow-remote-images",
                "remote_images_disabled")
        return _fetch(url, settings)
    raise bad_request(f"unsupported image URL scheme {scheme!r}; send a data URL (data:image/png;base64,...)"
                      + (" or an http(s) URL" if settings.allow_remote_images else ""), "unsupported_image_url")


def _check_bytes(size: int, settings: ServeSettings) -> None:
    if size > settings.max_image_bytes:
        raise too_large(f"the image is {size:,} bytes, above this server's limit of {settings.max_image_bytes:,}; "
                        "send a smaller image")


def _base64(text: str, settings: ServeSettings) -> bytes:
    text = "".join(text.split())  # line breaks are common in pasted base64
    _check_bytes(len(text) * 3 // 4, settings)  # refuse before decoding
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # the URL-safe alphabet, which some clients use; validated too, so that garbage is not
            # silently dropped (it decoded to 0 bytes and was reported as an empty image)
            data = base64.b64decode(text, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the image is not valid base64; send the image's bytes base64-encoded "
                              "(data:image/png;base64,...)", "invalid_image") from None
    if not data:
        raise bad_request("the image is empty (0 bytes)", "invalid_image")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in REMOTE_SCHEMES:
            raise bad_request(f"the image URL redirects to a non-http(s) URL: {newurl}", "unsupported_image_url")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, settings: ServeSettings) -> bytes:
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    request = urllib.request.Request(url, headers={"User-Agent": "viscpm-serve"})
    try:
        with opener.open(request, timeout=settings.remote_image_timeout) as response:
            data = response.read(settings.max_image_bytes + 1)
    except ApiError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise bad_request(f"could not fetch the image at {url}: {error}", "image_fetch_failed") from None
    _check_bytes(len(data), settings)
    if not data:
        raise bad_request(f"the image at {url} is empty", "invalid_image")
    return data


def decode_image(url: str, settings: ServeSettings) -> DecodedImage:
    """An ``image_url`` -> a decoded RGB image. Raises ApiError 400 (unusable) or 413 (too large).

    Blocking (base64, maybe a download, PIL decoding): call it off the event loop."""
    data = image_bytes(url, settings)
    try:  # PNG, JPEG, WebP and GIF only, whatever the data URL's MIME type says
        opened = open_image(io.BytesIO(data), "the image")
    except ImageError as error:
        if isinstance(error.__cause__, Image.DecompressionBombError):
            raise too_large(f"the image is larger than {settings.max_image_pixels:,} pixels (a decompression "
                            "bomb?); send a smaller image") from None
        raise bad_request("the image data is not a readable image (corrupt, truncated or not a "
                          f"{ALLOWED_FORMATS_TEXT}); send a PNG, JPEG, WebP or GIF", "invalid_image") from None
    width, height = opened.size
    if width * height > settings.max_image_pixels:
        raise too_large(f"the image is {width}x{height} = {width * height:,} pixels, above this server's limit "
                        f"of {settings.max_image_pixels:,}; downscale it")
    try:
        image = load_image(opened, max_pixels=settings.max_image_pixels)  # decodes; corrupt data fails here
    except ImageError as error:
        raise bad_request(f"the image cannot be used: {error}", "invalid_image") from None
    return DecodedImage(image, hashlib.sha256(data).hexdigest())


def png_base64(painted) -> str:
    """A ``PaintedImage`` as base64 PNG, carrying its settings in a ``viscpm`` text chunk as
    ``PaintedImage.save`` writes them."""
    info = PngInfo()
    settings = {f.name: getattr(painted, f.name) for f in fields(painted) if f.name != "image"}
    info.add_text("viscpm", json.dumps(settings, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    painted.image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
