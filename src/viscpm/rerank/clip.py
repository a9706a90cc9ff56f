"""The official ranker: Chinese-CLIP's image–text logit, from a local folder.

The official code loaded ``OFA-Sys/chinese-clip-vit-base-patch16`` from the hub and kept, of 4
candidates, the one with the largest diagonal entry of ``logits_per_image`` for the text
``[prompt] * 4``. Each diagonal entry is ``logit_scale · cos(image_i, text)``, so here the text is
encoded once and every image scored against it: the same numbers.

The image preprocessing is transformers' PIL implementation (no torchvision needed). Prompts
longer than the text encoder's position table are truncated (the official call crashed).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..checkpoints import CheckpointError


class ChineseCLIPRanker:
    name = "chinese-clip"

    def __init__(self, model, image_processor, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.image_processor, self.tokenizer = model.to(device).eval(), image_processor, tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ChineseCLIPRanker:
        """From a local folder with ``config.json``, weights, ``preprocessor_config.json`` and the
        tokenizer files (``vocab.txt``), as ``chinese-clip-vit-base-patch16`` is laid out."""
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"Chinese-CLIP model not found at {path} (no config.json); pass a local folder "
                                  "such as chinese-clip-vit-base-patch16")
        from transformers import AutoTokenizer, ChineseCLIPModel
        from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

        try:
            model = ChineseCLIPModel.from_pretrained(folder, local_files_only=True)
            processor = ChineseCLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot load Chinese-CLIP from {folder}: {error}") from None
        return cls(model, processor, tokenizer, device)

    @torch.no_grad()
    def __call__(self, prompt: str, images: Sequence[Image.Image]) -> list[float]:
        limit = self.model.config.text_config.max_position_embeddings
        text = self.tokenizer([prompt], padding=True, truncation=True, max_length=limit, return_tensors="pt")
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        dtype = next(self.model.parameters()).dtype
        out = self.model(**text.to(self.device), pixel_values=pixels.to(self.device, dtype))
        return out.logits_per_image[:, 0].float().tolist()  # (n_images, 1 text) -> n scores
