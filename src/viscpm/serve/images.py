"""Images in and out of the API: ``image_url`` parts -> checked RGB images; painted images -> PNG.

Accepted image URLs: ``data:`` URLs (``data:image/png;base64,...``) and bare base64. ``http(s)://``
only when the server enables remote images, and then only from public addresses (checked after DNS
resolution and at every redirect), within one deadline and byte limit for the whole fetch, with one
error text for every failure; ``file://`` and every other scheme never (a server must not read its
own disk on a client's behalf). Sizes are checked before anything is decoded:
the base64 length, the decoded bytes, then width x height from the image header, so a
decompression bomb is refused without being expanded.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, fields

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..image_processing import ALLOWED_FORMATS_TEXT, ImageError, load_image, open_image
from .errors import ApiError, bad_request
from .settings import ServeSettings

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
REMOTE_SCHEMES = ("http", "https")
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class DecodedImage:
    image: "Image.Image"  # RGB, decoded
    key: str  # sha256 of the encoded bytes: the vision-state cache key


def _scheme_of(url: str) -> str | None:
    match = _SCHEME.match(url.strip())
    return match.group(1).lower() if match else None


def too_large(message: str) -> ApiError:
    return ApiError(413, message, "image_too_large")


def image_bytes(url: str, settings: ServeSettings) -> bytes:
    """The encoded image bytes behind an ``image_url``, with its scheme and size checked."""
    url = url.strip()
    if not url:
        raise bad_request("the image_url is empty; send a data URL such as data:image/png;base64,...",
                          "invalid_image_url")
    scheme = _scheme_of(url)
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


def fetch_failed(settings: ServeSettings) -> ApiError:
    """The one answer to every failed fetch. Saying which step failed (refused, timed out, not an
    image) would let a client map the hosts and ports the server can reach; the log has the cause."""
    return bad_request(
        "the image URL could not be used: its host is not reachable or not allowed (public http(s) hosts only), "
        f"or it did not send a {ALLOWED_FORMATS_TEXT} image of at most {settings.max_image_bytes:,} bytes within "
        f"{settings.remote_image_timeout:g} s; send the image inline as a data URL (data:image/png;base64,...)",
        "image_fetch_failed")


class _FetchError(Exception):
    """Why a fetch failed, for the log only (the client gets ``fetch_failed``)."""


def _allowed_address(address: str, settings: ServeSettings) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(network) for network in settings.allowed_image_networks):
        return True
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, settings: ServeSettings, deadline: float) -> str:
    """The address to connect to: every address ``host`` resolves to must be allowed (a name that
    also resolves to 127.0.0.1 is refused), checked after resolution so names and spellings such as
    0x7f000001 cannot hide a loopback or private address."""
    pool = concurrent.futures.ThreadPoolExecutor(1)  # getaddrinfo takes no timeout: wait for it on the side
    lookup = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    pool.shutdown(wait=False)  # a stuck lookup ends with the resolver's own timeout, unwaited
    try:
        addresses = [info[4][0] for info in lookup.result(timeout=max(0.0, deadline - time.monotonic()))]
    except concurrent.futures.TimeoutError:
        raise _FetchError(f"resolving {host} took too long") from None
    refused = [a for a in addresses if not _allowed_address(a, settings)]
    if refused or not addresses:
        raise _FetchError(f"{host} resolves to {refused or 'nothing'}, which is not a public address")
    return addresses[0]


def _get(url: str, settings: ServeSettings, deadline: float) -> bytes | str:
    """One GET of ``url``, connected to an allowed address only; returns the body, or the URL a
    redirect points to. Everything, headers included, ends at ``deadline``."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES or not parts.hostname:
        raise _FetchError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if scheme == "https" else 80)
    address = _resolve(parts.hostname, port, settings, deadline)
    kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, port, timeout=max(0.001, deadline - time.monotonic()))
    # connect to the address checked above, not to a second lookup of the name (which DNS could
    # answer differently); TLS still checks the certificate against the host name
    connection._create_connection = lambda _, *args: socket.create_connection((address, port), *args)
    # a server that trickles a byte at a time never trips a per-read timeout: cut the socket at the deadline
    opened: list = []  # the connected socket: http.client lets go of it once the response owns it
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()),
                               lambda: _cut(opened[0] if opened else connection.sock))
    watchdog.start()
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("GET", path, headers={"User-Agent": "viscpm-serve", "Accept": "image/*"})
        opened.append(connection.sock)
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            return urllib.parse.urljoin(url, response.getheader("Location", ""))
        if response.status != 200:
            raise _FetchError(f"HTTP {response.status}")
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > settings.max_image_bytes:
                raise _FetchError(f"more than {settings.max_image_bytes:,} bytes")
            chunks.append(chunk)
        if time.monotonic() >= deadline:
            raise _FetchError(f"slower than {settings.remote_image_timeout:g} s")
        return b"".join(chunks)
    finally:
        watchdog.cancel()
        connection.close()


def _cut(sock: socket.socket | None) -> None:
    with contextlib.suppress(OSError, AttributeError):  # already closed, or not yet connected
        sock.shutdown(socket.SHUT_RDWR)


def _fetch(url: str, settings: ServeSettings) -> bytes:
    deadline = time.monotonic() + settings.remote_image_timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            got = _get(url, settings, deadline)
            if isinstance(got, bytes):
                if not got:
                    raise _FetchError("an empty body")
                return got
            url = got  # a redirect: checked again, address included
        raise _FetchError(f"more than {MAX_REDIRECTS} redirects")
    except (_FetchError, OSError, ValueError, http.client.HTTPException) as error:
        logger.info("remote image %s not fetched: %s: %s", url, type(error).__name__, error)
        raise fetch_failed(settings) from None


def decode_image(url: str, settings: ServeSettings) -> DecodedImage:
    """An ``image_url`` -> a decoded RGB image. Raises ApiError 400 (unusable) or 413 (too large).

    Blocking (base64, maybe a download, PIL decoding): call it off the event loop."""
    data = image_bytes(url, settings)
    try:
        return decode_image_bytes(data, settings)
    except ApiError as error:
        if _scheme_of(url) in REMOTE_SCHEMES:
            logger.info("remote image %s not used: %s", url, error.message)
            raise fetch_failed(settings) from None  # one answer for every remote failure (see fetch_failed)
        raise


def _open_checked(data: bytes, settings: ServeSettings) -> Image.Image:
    """The image in ``data``, opened (not yet decoded), its format and size checked."""
    _check_bytes(len(data), settings)  # an upload's own bound (a data URL's was checked before decoding)
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
    return opened


def decode_image_bytes(data: bytes, settings: ServeSettings) -> DecodedImage:
    """Encoded image bytes (a data URL's payload, an upload) -> a decoded RGB image; 400/413 as above."""
    opened = _open_checked(data, settings)
    try:
        image = load_image(opened, max_pixels=settings.max_image_pixels)  # decodes; corrupt data fails here
    except ImageError as error:
        raise bad_request(f"the image cannot be used: {error}", "invalid_image") from None
    return DecodedImage(image, hashlib.sha256(data).hexdigest())


def decode_mask_bytes(data: bytes, settings: ServeSettings) -> Image.Image:
    """An inpainting mask -> a greyscale image where white marks what to repaint. A mask with transparent
    pixels follows OpenAI's convention (fully transparent = edit); an opaque one, diffusers' (white = edit)."""
    opened = _open_checked(data, settings)
    try:
        opened.load()
        if opened.mode in ("RGBA", "LA", "PA") or "transparency" in opened.info:
            alpha = opened.convert("RGBA").getchannel("A")
            if alpha.getextrema()[0] < 255:
                return alpha.point(lambda a: 255 if a == 0 else 0)
        return opened.convert("L")
    except (OSError, ValueError, SyntaxError):
        raise bad_request("the mask is not a readable image (corrupt or truncated); send a PNG",
                          "invalid_image", "mask") from None


def png_base64(painted) -> str:
    """A ``PaintedImage`` as base64 PNG, carrying its settings in a ``viscpm`` text chunk as
    ``PaintedImage.save`` writes them."""
    info = PngInfo()
    settings = {f.name: getattr(painted, f.name) for f in fields(painted) if f.name != "image"}
    info.add_text("viscpm", json.dumps(settings, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    painted.image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
