"""The server's limits, each a named constant, and the settings object that carries them.

Every limit can be changed per server through :class:`ServeSettings` (``viscpm serve`` exposes the
common ones as flags); the constants are the defaults and what the README documents.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# -- requests --------------------------------------------------------------------------------
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # whole HTTP body; larger -> 413 before it is read
MAX_TEXT_CHARS = 16_000  # all text of one request (every message, stop strings; or prompt + negative) -> 400
MAX_MESSAGES = 64  # messages in one chat request -> 400
MAX_STOP_STRINGS = 4  # as in OpenAI's API
# -- images sent to chat ---------------------------------------------------------------------
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one image, after base64 decoding -> 413
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height read from the header, before decoding -> 413
REMOTE_IMAGE_TIMEOUT_S = 10.0  # fetching an http(s) image (all of it), when remote images are enabled
# -- generation ------------------------------------------------------------------------------
DEFAULT_MAX_NEW_TOKENS = 256  # when a chat request names no max_tokens
MAX_NEW_TOKENS = 1024  # the largest max_tokens a chat request may ask for -> 400
MAX_BEAMS = 8
MAX_PAINT_IMAGES = 4  # n of one image request -> 400
MAX_PAINT_SIDE = 1024  # width and height of painted images -> 400
MAX_PAINT_STEPS = 100  # num_inference_steps -> 400
# -- scheduling ------------------------------------------------------------------------------
MAX_QUEUE = 64  # requests waiting or running per model; one more -> 429
REQUEST_TIMEOUT_S = 300.0  # from arrival to the last byte of the answer -> 504, generation stopped
BATCH_WINDOW_MS = 5.0  # how long a non-streamed chat request waits for others to share its batch
MAX_BATCH_SIZE = 8  # chat requests decoded together
VISION_CACHE_SIZE = 16  # encoded images kept, so a multi-turn chat does not re-encode its image

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
# Host header names answered by default (the bound address is added by `viscpm serve`); see
# ServeSettings.allowed_hosts
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = {"0.0.0.0", "::", ""}


@dataclass(frozen=True)
class ServeSettings:
    """What a server allows. ``api_key``: when set, every ``/v1`` request must send
    ``Authorization: Bearer <api_key>``. ``allowed_hosts``: the host names (lower case, IPv6
    without brackets) a request's ``Host`` header may name, against DNS rebinding; None answers
    any (see :func:`allowed_hosts_for`)."""

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = DEFAULT_ALLOWED_HOSTS
    chat_model_name: str = "viscpm-chat"
    paint_model_name: str = "viscpm-paint"
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_text_chars: int = MAX_TEXT_CHARS
    max_messages: int = MAX_MESSAGES
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    allow_remote_images: bool = False  # http(s) image URLs; file:// and other schemes never
    allow_safety_off: bool = False  # may a request turn a safety checker off ("..._safety_checker": false)?
    remote_image_timeout: float = REMOTE_IMAGE_TIMEOUT_S  # the whole fetch, redirects included
    # networks remote images may come from besides public addresses (e.g. "10.0.0.0/8" for an
    # intranet); loopback, private, link-local and other special addresses are refused otherwise
    allowed_image_networks: tuple[str, ...] = ()
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens: int = MAX_NEW_TOKENS
    max_beams: int = MAX_BEAMS
    max_paint_images: int = MAX_PAINT_IMAGES
    max_paint_side: int = MAX_PAINT_SIDE
    max_paint_steps: int = MAX_PAINT_STEPS
    default_paint_steps: int | None = None  # None: the pipeline's default (50, as officially)
    max_queue: int = MAX_QUEUE
    request_timeout: float = REQUEST_TIMEOUT_S
    batch_window_ms: float = BATCH_WINDOW_MS
    max_batch_size: int = MAX_BATCH_SIZE
    vision_cache_size: int = VISION_CACHE_SIZE

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; pass a non-empty key or None")
        for name in ("max_request_bytes", "max_text_chars", "max_messages", "max_image_bytes", "max_image_pixels",
                     "default_max_new_tokens", "max_new_tokens", "max_beams", "max_paint_images", "max_paint_side",
                     "max_paint_steps", "max_queue", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_new_tokens ({self.default_max_new_tokens}) is above max_new_tokens "
                             f"({self.max_new_tokens})")
        for network in self.allowed_image_networks:
            ipaddress.ip_network(network)  # a ValueError names a malformed one
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def allowed_hosts_for(bound: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to ``bound`` answers: the loopback names, the bound address
    and ``extra``. A wildcard address (0.0.0.0, ::) is reached by names this machine cannot know,
    so it answers any unless ``extra`` lists them; its API key protects it (see check_binding).
    ``"*"`` in ``extra`` answers any."""
    if "*" in extra or (bound.strip("[]") in WILDCARD_ADDRESSES and not extra):
        return None
    names = [*DEFAULT_ALLOWED_HOSTS, bound, *extra]
    return tuple(dict.fromkeys(name.strip("[]").lower() for name in names if name.strip("[]") not in WILDCARD_ADDRESSES))


def check_binding(host: str, api_key: str | None) -> None:
    """Refuse to expose a server beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"binding {host!r} makes the server reachable from other machines, so it needs an API key: pass "
            "--api-key KEY or set VISCPM_API_KEY (or bind 127.0.0.1 to keep it local)"
        )
