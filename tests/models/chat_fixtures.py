"""The tiny official-format chat checkpoint as a state dict, and the loader the model tests use
(shared with the checkpoint-error, pipeline, serving, rerank and loading tests)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from viscpm.checkpoints import load_weights
from viscpm.models.chat import CHAT_KEY_RULES, CHAT_PRESETS, CHAT_UNUSED_OFFICIAL_KEYS, ChatConfig, ChatModel


def official_tiny_state(reference, with_mim_head=False):
    state = load_file(reference / "chat" / "tiny_viscpm_chat_nonllm.safetensors")
    state.update({"llm." + k: v for k, v in load_file(reference / "llm" / "tiny_cpmbee.safetensors").items()})
    if with_mim_head:  # the official file carries this unused head; the golden file leaves it out
        state["vpm.mim_head.weight"] = torch.zeros(8192, 1024)
        state["vpm.mim_head.bias"] = torch.zeros(8192)
    return state


def load_tiny(reference, path):
    return load_weights(path, reference / "chat" / "tiny_viscpm_chat_config.json",
                        config_from_dict=ChatConfig.from_dict, presets=CHAT_PRESETS, build=ChatModel,
                        rules=CHAT_KEY_RULES, unused=CHAT_UNUSED_OFFICIAL_KEYS)[0]
