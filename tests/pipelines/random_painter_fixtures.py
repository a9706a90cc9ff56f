"""A random tiny painter saved as a folder in our format, for the speed and eval-paint tests
(registered as a plugin in conftest.py)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from viscpm.checkpoints import VAE_FOLDER, save_folder
from viscpm.models.cpmbee import CPMBeeConfig
from viscpm.models.paint import BridgeConfig, PaintConfig, PaintModel

VOCAB = Path(str(resources.files("viscpm") / "assets" / "paint" / "vocab.txt"))  # 576 tokens
VOCAB_SIZE = 576
UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": [2, 4], "norm_num_groups": 8, "use_linear_projection": True,
}
VAE_TILE = 16  # pixels; the VAE's factor is 2, so latents wider than 8 are decoded in tiles


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny painter saved as a folder: CPM-Bee d=32, a two-block UNet, a factor-2 VAE."""
    torch.manual_seed(0)
    llm = CPMBeeConfig(vocab_size=VOCAB_SIZE, dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16)
    config = PaintConfig(llm, UNET, BridgeConfig(32, 32))
    folder = save_folder(PaintModel(config), config, tmp_path_factory.mktemp("paint_speed"), VOCAB)
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, layers_per_block=1,
                  sample_size=VAE_TILE).save_pretrained(folder / VAE_FOLDER)
    return folder
