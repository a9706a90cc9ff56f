"""A tiny Chinese-CLIP folder (shared with the eval and CLI tests)."""
from __future__ import annotations

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "red", "猫", "红", "色"]


def write_chinese_clip(folder):
    """A tiny Chinese-CLIP saved as chinese-clip-vit-base-patch16 is laid out: config.json,
    weights, preprocessor_config.json, vocab.txt + tokenizer_config.json."""
    from transformers import BertTokenizer, ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=30, patch_size=10),
        projection_dim=16)
    torch.manual_seed(0)
    ChineseCLIPModel(config).save_pretrained(folder)
    ChineseCLIPImageProcessorPil(size={"height": 30, "width": 30},
                                 crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder
