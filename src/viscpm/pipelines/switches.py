"""The per-call meaning of a pipeline's safety and ranking switches, in one place.

Turning a name or a folder into a checker or ranker happens once, where the pipeline is built (its
path constructor, the CLI, the server's start-up). A call then only switches: ``None`` keeps the
pipeline's own, ``False`` turns it off, ``True`` turns it on (the pipeline's own, or the default
when it was built off) and a callable replaces it for this call.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def resolve_switch(name: str, override, built: T | None, default: Callable[[], T | None]) -> T | None:
    """The checker or ranker ``name`` for one call; ``default`` loads the one ``True`` turns on
    when the pipeline was built without one (pass a cached loader: it is called per call)."""
    if override is None or (override is True and built is not None):
        return built
    if override is True:
        return default()
    if override is False:
        return None
    if callable(override):
        return override
    raise ValueError(f"{name}: per call, pass true or false (or, from Python, a callable); load checkers and "
                     f"rankers from names or folders when building the pipeline, got {override!r}")
