"""Safety checkers for prompts and images, pluggable and offline.

Prompt checkers ``(str) -> SafetyResult | bool`` and image checkers ``(PIL.Image) -> SafetyResult
| bool``; truthy means flagged. What the pipelines' switches accept (``prompt_safety_checker=``,
``image_safety_checker=``), resolved here:

===================  ==================================  =====================================
switch value         prompt checker                      image checker
===================  ==================================  =====================================
``None`` (default)   the lexicon checker (shipped list)  NudeNet when ``viscpm[safety]`` is
                                                         installed, else off (logged)
``True``             the lexicon checker                 NudeNet, or an error saying to install it
``False``            off                                 off
a name               ``"lexicon"``, ``"off"``            ``"nudenet"``, ``"off"``
a file               the lexicon checker + these terms   -
a folder             the official BERT classifier        the official Stable Diffusion checker
a callable           used as is                          used as is
===================  ==================================  =====================================
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from .base import ImageChecker, PromptChecker, Refused, SafetyResult, verdict
from .classifiers import BertPromptChecker, StableDiffusionImageChecker
from .lexicon import LexiconChecker, normalise, read_word_list
from .nudenet import INSTALL_HINT, NudeNetImageChecker, nudenet_available

logger = logging.getLogger(__name__)

__all__ = [
    "BertPromptChecker", "ImageChecker", "LexiconChecker", "NudeNetImageChecker", "PromptChecker", "Refused",
    "SafetyResult", "StableDiffusionImageChecker", "load_image_checker", "load_prompt_checker", "normalise",
    "read_word_list", "screen_images", "verdict",
]

OFF = ("off", "none", "false")
DEFAULT = ("default", "auto")


def _named(spec) -> str | None:
    return spec.strip().lower() if isinstance(spec, str) else None


def load_prompt_checker(spec=None, word_lists: Sequence[str | os.PathLike] = ()) -> PromptChecker | None:
    """The prompt checker a switch value names (see the module docstring); ``word_lists`` add
    terms to the lexicon checker."""
    name = _named(spec)
    if spec is False or name in OFF:
        return None
    if spec is None or spec is True or name in DEFAULT or name == "lexicon":
        return LexiconChecker.default(extra=word_lists)
    if isinstance(spec, (str, os.PathLike)):
        if os.path.isfile(spec):  # a word list file: its terms on top of the shipped list
            return LexiconChecker.default(extra=[spec, *word_lists])
        return BertPromptChecker.from_pretrained(spec)
    if callable(spec):
        return spec
    raise TypeError(f"prompt_safety_checker must be None, a bool, 'lexicon', a word list file, a classifier folder "
                    f"or a callable (str) -> bool, got {type(spec).__name__}")


def load_image_checker(spec=None) -> ImageChecker | None:
    """The image checker a switch value names (see the module docstring)."""
    name = _named(spec)
    if spec is False or name in OFF:
        return None
    if spec is None or name in DEFAULT:
        if not nudenet_available():
            logger.info("image safety checker: NudeNet is not installed (%s), so images are not checked", INSTALL_HINT)
            return None
        return NudeNetImageChecker()
    if spec is True or name == "nudenet":
        if not nudenet_available():
            raise ValueError(f"the default image safety checker is NudeNet, which is not installed: {INSTALL_HINT}; "
                             "or pass image_safety_checker=False, a Stable Diffusion safety checker folder or a "
                             "callable")
        return NudeNetImageChecker()
    if isinstance(spec, (str, os.PathLike)):
        return StableDiffusionImageChecker.from_pretrained(spec)
    if callable(spec):
        return spec
    raise TypeError(f"image_safety_checker must be None, a bool, 'nudenet', a safety checker folder or a callable "
                    f"(PIL.Image) -> bool, got {type(spec).__name__}")


def screen_images(checker: ImageChecker | None, images: Sequence) -> tuple[list, list[SafetyResult]]:
    """Run ``checker`` on each image; flagged images are replaced by black ones of the same size.
    Returns the images to keep and every verdict."""
    from PIL import Image

    if checker is None:
        return list(images), [SafetyResult(False) for _ in images]
    results = [verdict(checker(image), "image safety checker") for image in images]
    kept = [Image.new("RGB", image.size) if result else image for image, result in zip(images, results)]
    return kept, results
