"""The official VisCPM checkers, loaded from local folders (never downloaded).

* :class:`BertPromptChecker` — the prompt classifier VisCPM-Paint shipped (a BERT sequence
  classifier in ``VisCPM-Paint/text-security-checker``): a prompt is unsafe when label 1 scores
  more than 0.75, as officially.
* :class:`StableDiffusionImageChecker` — diffusers' ``StableDiffusionSafetyChecker`` (the
  ``CompVis/stable-diffusion-safety-checker`` folder) on CLIP image features; the official code
  used it on Paint's outputs (and, when asked, on Chat's input images).

transformers and diffusers are imported when a checker is loaded, not before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoints import CheckpointError
from .base import SafetyResult

logger = logging.getLogger(__name__)

BERT_UNSAFE_LABEL = 1  # official: label 1 ("LABEL_1") is unsafe
BERT_THRESHOLD = 0.75  # official: flagged when its score is above this
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")

_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what} not found at {path} (no config.json); pass a local folder such as the one "
                              f"saved by save_pretrained")
    return folder


class BertPromptChecker:
    """The official prompt checker: ``softmax(BERT(prompt))[unsafe_label] > threshold`` flags it.

    The official code ran a transformers text-classification pipeline and flagged when its top
    label was ``LABEL_1`` with a score above 0.75; with two labels that is exactly this rule.
    Prompts longer than the model's position table are truncated (the official call crashed)."""

    name = "bert"

    def __init__(self, model, tokenizer, threshold: float = BERT_THRESHOLD, unsafe_label: int = BERT_UNSAFE_LABEL,
                 device: str | torch.device = "cpu"):
        if unsafe_label >= model.config.num_labels:
            raise ValueError(f"unsafe_label {unsafe_label} is not a label of this classifier "
                             f"({model.config.num_labels} labels)")
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.threshold, self.unsafe_label, self.device = threshold, unsafe_label, torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options) -> BertPromptChecker:
        """From a local folder: ``config.json`` + weights + the tokenizer files (``vocab.txt``)."""
        folder = _folder(path, "prompt safety classifier")
        from transformers import AutoTokenizer, BertForSequenceClassification

        try:
            model = BertForSequenceClassification.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except _LOAD_ERRORS as error:
            raise CheckpointError(f"cannot load the prompt safety classifier from {folder}: {error}") from None
        return cls(model, tokenizer, **options)

    @torch.no_grad()
    def scores(self, prompt: str) -> torch.Tensor:
        """Label probabilities (num_labels,) for one prompt."""
        limit = self.model.config.max_position_embeddings
        encoded = self.tokenizer(prompt, truncation=True, max_length=limit, return_tensors="pt").to(self.device)
        return self.model(**encoded).logits[0].float().softmax(-1).cpu()

    def __call__(self, prompt: str) -> SafetyResult:
        probabilities = self.scores(prompt)
        score = float(probabilities[self.unsafe_label])
        flagged = score > self.threshold
        reason = (f"the prompt classifier rates it unsafe (score {score:.2f} > {self.threshold})" if flagged else "")
        return SafetyResult(flagged, reason, self.name, {"score": score, "probabilities": probabilities.tolist()})


class StableDiffusionImageChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` with its CLIP image preprocessing.

    The preprocessing is read from the folder's ``preprocessor_config.json`` (or a separate
    ``processor_path``); without one it is CLIP's standard 224-pixel preprocessing, which is what
    the official code loaded (``openai/clip-vit-base-patch32``'s processor). It runs on PIL, so no
    torchvision is needed."""

    name = "sd-safety-checker"

    def __init__(self, model, image_processor, device: str | torch.device = "cpu"):
        self.model, self.image_processor = model.to(device).eval(), image_processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, processor_path: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu") -> StableDiffusionImageChecker:
        folder = _folder(path, "image safety checker")
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processor_folder = Path(processor_path) if processor_path is not None else folder
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True)
            if any((processor_folder / name).is_file() for name in PROCESSOR_CONFIGS):
                processor = CLIPImageProcessorPil.from_pretrained(processor_folder, local_files_only=True)
            elif processor_path is not None:
                raise CheckpointError(f"no image preprocessing config ({' or '.join(PROCESSOR_CONFIGS)}) in "
                                      f"{processor_folder}")
            else:
                logger.info("no preprocessor_config.json in %s: using CLIP's standard preprocessing", folder)
                processor = CLIPImageProcessorPil()
        except _LOAD_ERRORS as error:
            raise CheckpointError(f"cannot load the image safety checker from {folder}: {error}") from None
        return cls(model, processor, device)

    @torch.no_grad()
    def check_batch(self, images: list[Image.Image]) -> list[SafetyResult]:
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        dtype = next(self.model.parameters()).dtype
        # the checker blacks out its `images` argument itself (and logs that it did, which is not
        # true of our images: the pipelines report what they do); we only need its verdicts
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        checker_logger = logging.getLogger(type(self.model).__module__)
        level = checker_logger.level
        checker_logger.setLevel(logging.ERROR)
        try:
            _, flags = self.model(clip_input=pixels.to(self.device, dtype), images=placeholders)
        finally:
            checker_logger.setLevel(level)
        return [SafetyResult(bool(f), "the Stable Diffusion safety checker detected an NSFW concept" if f else "",
                             self.name) for f in flags]

    def __call__(self, image: Image.Image) -> SafetyResult:
        return self.check_batch([image])[0]
