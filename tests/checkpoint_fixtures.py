"""The tiny official-format checkpoints in a user's layout, shared by the pipeline, CLI, serving
and rerank tests (registered as a plugin in conftest.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.pipelines.paint import VisCPMPaint

from .models.chat_fixtures import official_tiny_state as chat_state
from .models.paint_fixtures import official_tiny_state as paint_state

CHAT_CHECKPOINT = "viscpm_chat_tiny_checkpoint.pt"
PAINT_CHECKPOINT = "viscpm_paint_tiny_checkpoint.pt"
SIZE = 32  # the tiny UNet's 16 latent pixels x the tiny VAE's factor 2


def write_vae_folder(reference, folder):
    """A diffusers AutoencoderKL folder as a user has it: config.json + weights. The weights keep
    the pre-0.16 attention names (query/key/value/proj_attn), as the SD-2.1-base VAE on disk does."""
    config = json.loads((reference / "paint" / "tiny_viscpm_paint_config.json").read_text())["vae_config_resolved"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    shutil.copy(reference / "paint" / "tiny_vae.safetensors", folder / "diffusion_pytorch_model.safetensors")


def open_tiny(reference, paint_checkpoint_dir, **options):
    options = {"image_safety_checker": False, "prompt_safety_checker": False, "add_ranker": False, **options}
    return VisCPMPaint(paint_checkpoint_dir / PAINT_CHECKPOINT,
                       config_path=reference / "paint" / "tiny_viscpm_paint_config.json", progress_bar=False, **options)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.fixture(scope="session")
def chat_checkpoint_dir(reference, tmp_path_factory):
    """The official chat .pt (with its unused MIM head) and vocab.txt side by side."""
    folder = tmp_path_factory.mktemp("official_chat")
    torch.save(chat_state(reference, with_mim_head=True), folder / CHAT_CHECKPOINT)
    shutil.copy(reference / "cpmbee" / "vocab.txt", folder / "vocab.txt")
    return folder


@pytest.fixture(scope="session")
def paint_checkpoint_dir(reference, tmp_path_factory):
    """The official paint .pt, vocab.txt and vae/ side by side."""
    folder = tmp_path_factory.mktemp("official_paint")
    torch.save(paint_state(reference), folder / PAINT_CHECKPOINT)
    shutil.copy(reference / "cpmbee" / "vocab.txt", folder / "vocab.txt")
    write_vae_folder(reference, folder / "vae")
    return folder
