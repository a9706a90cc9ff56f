"""Paint fidelity scores with local weights only: CLIP score (CLIP or Chinese-CLIP) and FID, per
prompt language, plus the time per image.

Both metrics are torchmetrics' own (``CLIPScore``, ``FrechetInceptionDistance``); this module only
supplies them with local models, because torchmetrics would otherwise fetch CLIP and the Inception
network from the internet:

* CLIP score = max(100 · mean cos(image, prompt), 0) with a CLIP or Chinese-CLIP folder loaded by
  transformers (Chinese prompts need Chinese-CLIP; English CLIP does not read Chinese);
* FID: the Fréchet distance between features of the painted images and of a folder of reference
  images, from a feature network in a TorchScript file (``torch.jit.load``: tensors and TorchScript
  code, no Python pickle). The paper-comparable one is the TF-Inception port used by clean-fid and
  StyleGAN (``inception-2015-12-05.pt``, called with ``return_features=True``); any module mapping
  uint8 images (N, 3, S, S) to features (N, D) works, but then the numbers are not FID in the paper's
  sense. Images are resized to S × S (default 299) with PIL's bicubic filter, as clean-fid does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_processing import load_image

logger = logging.getLogger(__name__)

FID_IMAGE_SIZE = 299  # the Inception network's input size
REFERENCE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def prompt_language(text: str) -> str:
    """"zh" when the prompt holds a Chinese character, else "en"."""
    return "zh" if _CJK.search(text) else "en"


@dataclasses.dataclass(frozen=True)
class PaintPrompt:
    prompt: str
    lang: str


def load_prompts(path: str | Path) -> list[PaintPrompt]:
    """Prompts from a text file (one a line) or JSONL (``{"prompt": ..., "lang": "en"|"zh"}``, lang optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                text, lang = record["prompt"], record.get("lang") or prompt_language(record["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\"") from None
        else:
            text = line.strip()
            lang = prompt_language(text)
        prompts.append(PaintPrompt(text, lang))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _to_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """uint8 (3, H, W); resized to size × size with PIL bicubic when ``size`` is given."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


# -- CLIP score ---------------------------------------------------------------------------------


class _FeatureTensors(torch.nn.Module):
    """A CLIP model whose ``get_*_features`` return tensors: transformers 5 returns model outputs
    (projected embeddings in ``pooler_output``), torchmetrics 1.9 expects the tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _Processor:
    """Tokenizer + PIL image processor with the call torchmetrics makes; images arrive as uint8 tensors.
    (transformers' own processors would pick the torchvision image processor, which we do not install.)"""

    def __init__(self, tokenizer, image_processor, max_length: int):
        self.tokenizer, self.image_processor, self.max_length = tokenizer, image_processor, max_length

    def __call__(self, text=None, images=None, **kwargs):
        if images is not None:
            pil = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]
            return self.image_processor(images=pil, return_tensors="pt")
        return self.tokenizer(text, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")


def load_clip(folder: str | Path):
    """(model, processor) for torchmetrics from a local CLIP or Chinese-CLIP folder."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FileNotFoundError(f"--clip {folder}: no readable config.json; pass a local CLIP or Chinese-CLIP "
                                "folder (e.g. clip-vit-large-patch14, chinese-clip-vit-huge-patch14)") from None
    from transformers import AutoTokenizer

    if config.get("model_type") == "chinese_clip":
        from transformers import ChineseCLIPModel as Model
        from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
            ChineseCLIPImageProcessorPil as ImageProcessor,
        )
    elif config.get("model_type") == "clip":
        from transformers import CLIPModel as Model
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    else:
        raise ValueError(f"--clip {folder}: model_type {config.get('model_type')!r} is neither clip nor chinese_clip")
    try:
        model = Model.from_pretrained(folder, local_files_only=True).eval()
        processor = ImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load CLIP from {folder}: {error}") from None
    return _FeatureTensors(model), _Processor(tokenizer, processor, model.config.text_config.max_position_embeddings)


def _require_torchmetrics() -> None:
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("CLIP score and FID need torchmetrics: pip install 'viscpm[eval]'") from None


def clip_score_metric(folder: str | Path):
    _require_torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(folder)
    return CLIPScore(model_name_or_path=lambda: (model, processor))


# -- FID ----------------------------------------------------------------------------------------


class _InceptionFeatures(torch.nn.Module):
    """The clean-fid / StyleGAN TF-Inception TorchScript: float pixels 0..255, ``return_features=True``."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images.float(), return_features=True)


def load_fid_features(path: str | Path) -> torch.nn.Module:
    """The feature network in a TorchScript file, as torchmetrics' ``feature=`` module (uint8 in)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--fid-features {path} not found; pass a TorchScript feature network, e.g. "
                                "clean-fid's inception-2015-12-05.pt")
    try:
        network = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as error:
        raise ValueError(f"--fid-features {path} is not a TorchScript file ({error}); save one with "
                         "torch.jit.save(torch.jit.script(module), path)") from None
    arguments = [a.name for a in network.forward.schema.arguments]
    return _InceptionFeatures(network) if "return_features" in arguments else network


def fid_metric(features: torch.nn.Module):
    _require_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    # the real images' features are kept over reset(), so each language is compared with the same set
    return FrechetInceptionDistance(feature=features, reset_real_features=False,
                                    input_img_size=(3, FID_IMAGE_SIZE, FID_IMAGE_SIZE))


def reference_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference-images {folder}: not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in REFERENCE_SUFFIXES)[:limit]
    if len(paths) < 2:
        raise ValueError(f"--reference-images {folder}: FID needs at least 2 images ({sorted(REFERENCE_SUFFIXES)}), "
                         f"found {len(paths)}")
    return paths


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the evaluation -----------------------------------------------------------------------------


def paint_prompts(painter, prompts: Sequence[PaintPrompt], image_dir: Path, seed: int = 0,
                  **paint_options) -> tuple[list[Path], dict[int, float]]:
    """Paint prompt k with seed ``seed + k`` into ``image_dir/k.png``; images already there are kept
    (a re-run resumes). Returns the paths and, by prompt number, the seconds each image took to paint
    (kept in ``image_dir/seconds.jsonl``, so a resumed run still reports them)."""
    from .llava_bench import append_jsonl, read_jsonl

    image_dir.mkdir(parents=True, exist_ok=True)
    timings = image_dir / "seconds.jsonl"
    seconds = {r["index"]: r["seconds"] for r in read_jsonl(timings)}
    paths: list[Path] = []
    for number, item in enumerate(prompts):
        path = image_dir / f"{number:05d}.png"
        paths.append(path)
        if path.is_file():
            continue
        begun = time.perf_counter()
        image = painter.paint(item.prompt, seed=seed + number, **paint_options)[0].image
        # rounded as stored, so a resumed run reports exactly what the first run did
        seconds[number] = round(time.perf_counter() - begun, 4)
        image.save(path)
        append_jsonl(timings, {"index": number, "prompt": item.prompt, "seconds": seconds[number]})
        logger.info("painted %d/%d in %.2f s", number + 1, len(prompts), seconds[number])
    return paths, seconds


@torch.no_grad()
def score_images(prompts: Sequence[PaintPrompt], paths: Sequence[Path], clip=None, fid=None,
                 references: Sequence[Path] = (), batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """CLIP score and FID per prompt language for painted images at ``paths``. ``clip``/``fid``: the
    torchmetrics metrics (or None); ``references``: the real images for FID."""
    if fid is not None:
        for batch in _batches(references, batch_size):
            fid.update(torch.stack([_to_tensor(load_image(p), FID_IMAGE_SIZE) for p in batch]), real=True)
    scores: dict[str, dict[str, Any]] = {}
    for lang in sorted({p.lang for p in prompts}):
        chosen = [(p, path) for p, path in zip(prompts, paths) if p.lang == lang]
        result: dict[str, Any] = {"images": len(chosen)}
        if clip is not None:
            clip.reset()
            for batch in _batches(chosen, batch_size):
                clip.update([_to_tensor(load_image(path)) for _, path in batch], [p.prompt for p, _ in batch])
            result["clip_score"] = round(float(clip.compute()), 4)
        if fid is not None:
            fid.reset()
            if len(chosen) < 2:
                result["fid"] = None
                logger.warning("FID for %s needs at least 2 painted images, has %d", lang, len(chosen))
            else:
                for batch in _batches(chosen, batch_size):
                    fid.update(torch.stack([_to_tensor(load_image(path), FID_IMAGE_SIZE) for _, path in batch]),
                               real=False)
                result["fid"] = round(float(fid.compute()), 4)
        scores[lang] = result
    return scores


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
