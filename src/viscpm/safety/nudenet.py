"""The offline image checker: NudeNet's detector, which ships its ONNX model inside the wheel.

Install it with ``pip install 'viscpm[safety]'`` (nudenet + onnxruntime + opencv-python-headless).
Licence: the nudenet wheel carries the GNU AGPL-3.0 text (its package metadata says MIT; the
bundled 320n detector is a YOLOv8n, whose ultralytics code is AGPL-3.0). That is why it is an
optional extra, never a hard dependency: installing it is the user's choice.

An image is flagged when the detector finds an exposed-nudity class with a score of at least
``min_score``; covered body parts, faces and feet never flag.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
from PIL import Image

from .base import SafetyResult

UNSAFE_CLASSES = (
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)
MIN_SCORE = 0.5
INSTALL_HINT = "pip install 'viscpm[safety]'"


def nudenet_available() -> bool:
    try:
        import nudenet  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _detector():
    """One detector per process (loading the ONNX session takes a third of a second)."""
    try:
        from nudenet import NudeDetector
    except ImportError:
        raise ImportError(f"the NudeNet image checker needs the nudenet package: {INSTALL_HINT}") from None
    return NudeDetector()


class NudeNetImageChecker:
    name = "nudenet"

    def __init__(self, min_score: float = MIN_SCORE, classes: Iterable[str] = UNSAFE_CLASSES, detector=None):
        self.min_score, self.classes = min_score, frozenset(classes)
        self.detector = detector if detector is not None else _detector()

    def detect(self, image: Image.Image) -> list[dict]:
        """NudeNet's detections: ``{"class", "score", "box"}`` dicts."""
        # NudeNet reads images as OpenCV does (BGR); an RGB array reversed gives what
        # `detect(path)` would see for the same picture
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return self.detector.detect(bgr)

    def __call__(self, image: Image.Image) -> SafetyResult:
        detections = self.detect(image)
        hits = [d for d in detections if d["class"] in self.classes and d["score"] >= self.min_score]
        if not hits:
            return SafetyResult(False, checker=self.name, details={"detections": detections})
        found = ", ".join(f"{d['class'].lower().replace('_', ' ')} ({d['score']:.2f})" for d in hits)
        return SafetyResult(True, f"NudeNet detected {found}", self.name, {"detections": detections})
