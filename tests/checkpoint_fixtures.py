"""The tiny official-format checkpoints in a user's layout, shared by the pipeline, CLI and
rerank tests (registered as a plugin in conftest.py)."""
from __future__ import annotations

import shutil

import pytest
import torch

from .models.test_chat_model import official_tiny_state as chat_state
from .models.test_paint_model import official_tiny_state as paint_state
from .pipelines.test_paint_pipeline import CHECKPOINT as PAINT_CHECKPOINT
from .pipelines.test_paint_pipeline import write_vae_folder


@pytest.fixture(scope="session")
def chat_checkpoint_dir(reference, tmp_path_factory):
    """The official chat .pt (with its unused MIM head) and vocab.txt side by side."""
    folder = tmp_path_factory.mktemp("official_chat")
    torch.save(chat_state(reference, with_mim_head=True), folder / "viscpm_chat_tiny_checkpoint.pt")
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
