"""The mid-size models the benchmarks share: the configuration the official code was timed on
(``shared/reference/timings.json``: CPM-Bee d=1024, 8 layers, 16 heads × 64, FFN 2816, vocab
86,583; BEiT-3 d=192 × 4 layers at 224 px; 64 queries), with random weights, written in our saved
format so the pipelines load them as a user's folder.

Paint has no timed official mid size; it pairs the same CPM-Bee with a small Stable-Diffusion-
shaped UNet (two cross-attention levels, 128/256 channels, 32×32 latents) and the packaged VAE,
i.e. 128×128 images.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from viscpm.checkpoints import save_folder
from viscpm.models.beit3 import BEiT3Config
from viscpm.models.chat import ChatConfig, ChatModel
from viscpm.models.cpmbee import CPMBeeConfig
from viscpm.models.paint import BridgeConfig, PaintConfig, PaintModel
from viscpm.pipelines.defaults import default_model_path

MID_LLM = CPMBeeConfig(vocab_size=86_583, dim_model=1024, dim_ff=2816, num_layers=8, num_heads=16, dim_head=64)
MID_CHAT = ChatConfig(MID_LLM, BEiT3Config(image_size=224, patch_size=16, dim=192, num_heads=3, ffn_dim=768,
                                           num_layers=4), query_num=64)
MID_UNET = {"sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 256,
            "attention_head_dim": [2, 4], "norm_num_groups": 32, "use_linear_projection": True}
MID_PAINT = PaintConfig(MID_LLM, MID_UNET, BridgeConfig(1024, 256))


def write_vocab(path: Path, size: int) -> Path:
    """The packaged ShapesWorld vocab (so questions tokenize as in real use), padded with filler
    tokens that no text spells to the official vocabulary size."""
    tokens = (default_model_path("chat") / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens += [f"filler{i:06d}" for i in range(size - len(tokens))]
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def write_mid_models(root: Path, kinds: tuple[str, ...] = ("chat", "paint")) -> dict[str, Path]:
    """Random-weight mid-size models in fp32 under ``root`` (reused when already there)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = root / "vocab.txt"
    if not vocab.is_file():
        write_vocab(vocab, MID_LLM.vocab_size)
    folders = {}
    for kind in kinds:
        folder = folders[kind] = root / kind
        if (folder / "model.safetensors").is_file():
            continue
        torch.manual_seed(0)
        model, config = (ChatModel(MID_CHAT), MID_CHAT) if kind == "chat" else (PaintModel(MID_PAINT), MID_PAINT)
        save_folder(model, config, folder, vocab)
        if kind == "paint":
            shutil.copytree(default_model_path("paint") / "vae", folder / "vae", dirs_exist_ok=True)
    return folders
