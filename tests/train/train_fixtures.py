"""A tiny world for training tests: a small vocab, a few texts, coloured images, conversations
and tiny model configs, all written into a temp folder."""
from __future__ import annotations

import json
import string
from pathlib import Path

from PIL import Image

from viscpm.shapes.corpus import SPECIAL_TOKENS

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}

LLM = {"vocab_size": None, "dim_model": 32, "dim_ff": 64, "num_layers": 2, "num_heads": 2, "dim_head": 16}
VISION = {"image_size": 32, "patch_size": 16, "dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 1}


def write_vocab(path: Path) -> int:
    specials = list(SPECIAL_TOKENS[:11])  # the official vocab's first 11 lines (checked in test_shapes_corpus.py)
    words = ["red", "green", "blue", "yellow", "colour", "What", "is", "the", "It", "image", "picture"]
    chars = [c for c in string.printable if c.strip() and c not in "<>"] + sorted(set("".join(ZH.values()) + "这是什么颜色的？图片"))
    lines = specials + [t for t in dict.fromkeys(words + chars) if t not in specials]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def write_world(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = write_vocab(root / "vocab.txt")
    (root / "images").mkdir(exist_ok=True)
    captions, conversations, texts = [], [], []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / "images" / f"{name}.png")
        captions.append({"image": f"images/{name}.png", "caption": f"a {name} image"})
        conversations.append({"id": name, "image": f"images/{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": f"It is {name}."},
            {"from": "human", "value": "这是什么颜色的？"},
            {"from": "gpt", "value": ZH[name]},
        ]})
        texts.append({"context": "", "question": f"What is {name}?", "<ans>": f"{name} is {ZH[name]}"})
    (root / "texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (root / "conversations.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations),
                                              encoding="utf-8")
    llm = dict(LLM, vocab_size=vocab_size)
    (root / "lm.json").write_text(json.dumps(llm))
    (root / "chat.json").write_text(json.dumps({"llm": llm, "vision": VISION, "query_num": 4}))
    return {name: root / f for name, f in [("vocab", "vocab.txt"), ("texts", "texts.jsonl"), ("captions", "captions.jsonl"),
                                           ("conversations", "conversations.jsonl"), ("lm", "lm.json"), ("chat", "chat.json")]}


def write_config(path: Path, model: dict, data: dict, train: dict, lora: dict | None = None) -> Path:
    def section(name, values):
        lines = [f"[{name}]"]
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
        return "\n".join(lines)

    parts = [section("model", model), section("data", data), section("train", train)]
    if lora is not None:
        parts.append(section("lora", lora))
    path.write_text("\n\n".join(parts) + "\n")
    return path
