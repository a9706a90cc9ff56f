"""What every checker returns, and the error a refusal raises."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class SafetyResult:
    """A checker's verdict. Truthy when flagged, so it also serves where a plain ``bool`` is expected."""

    flagged: bool
    reason: str = ""  # why it was flagged, in words a user can act on ("" when it was not)
    checker: str = ""  # which checker decided
    details: dict = field(default_factory=dict)  # checker-specific evidence: matches, scores, detections

    def __bool__(self) -> bool:
        return self.flagged


PromptChecker = Callable[[str], "bool | SafetyResult"]  # truthy = flagged
ImageChecker = Callable[[Image.Image], "bool | SafetyResult"]  # truthy = flagged


def verdict(result: bool | SafetyResult, what: str) -> SafetyResult:
    """A checker's return value as a SafetyResult (plain callables may return a bool)."""
    if isinstance(result, SafetyResult):
        return result
    return SafetyResult(bool(result), f"flagged by the {what}" if result else "", what)


class Refused(ValueError):
    """A safety checker refused the input; nothing was generated. ``reason`` says why."""

    def __init__(self, message: str, reason: str = "", checker: str = ""):
        super().__init__(message)
        self.reason = reason
        self.checker = checker
