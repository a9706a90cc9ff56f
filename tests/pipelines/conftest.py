"""The tiny official-format pipelines and the golden test picture, for the pipeline tests."""
from __future__ import annotations

import pytest
from PIL import Image

from viscpm.pipelines.chat import VisCPMChat

from ..checkpoint_fixtures import CHAT_CHECKPOINT, open_tiny


@pytest.fixture(scope="module")
def chat(reference, chat_checkpoint_dir):
    return VisCPMChat(chat_checkpoint_dir / CHAT_CHECKPOINT,
                      config_path=reference / "chat" / "tiny_viscpm_chat_config.json")


@pytest.fixture(scope="module")
def image(reference):
    return Image.open(reference / "data" / "figures" / "vlu_case1.png").convert("RGB")


@pytest.fixture(scope="module")
def painter(reference, paint_checkpoint_dir):
    return open_tiny(reference, paint_checkpoint_dir)
