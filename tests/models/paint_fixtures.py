"""The tiny official-format paint checkpoint as a state dict, its config and the loader the model
tests use (shared with the checkpoint-error, pipeline and serving tests)."""
from __future__ import annotations

from safetensors.torch import load_file

from viscpm.checkpoints import load_weights
from viscpm.models.paint import PAINT_KEY_RULES, PAINT_PRESETS, PaintConfig, PaintModel

PROMPTS = {"en": "a photo of a cat sitting on a sofa", "zh": "海上生明月，天涯共此时，唯美风格，抽象风格"}


def official_tiny_state(reference):
    """The official Paint checkpoint layout: trans_block.*, unet.*, llm.*."""
    state = load_file(reference / "paint" / "tiny_viscpm_paint_nonllm.safetensors")
    state.update({"llm." + k: v for k, v in load_file(reference / "llm" / "tiny_cpmbee.safetensors").items()})
    return state


def tiny_config_path(reference):
    return reference / "paint" / "tiny_viscpm_paint_config.json"


def load_tiny(reference, path, config_path="tiny"):
    config_path = tiny_config_path(reference) if config_path == "tiny" else config_path
    return load_weights(path, config_path, config_from_dict=PaintConfig.from_dict, presets=PAINT_PRESETS,
                        build=PaintModel, rules=PAINT_KEY_RULES)
