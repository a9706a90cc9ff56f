"""The official tiny CPM-Bee in our key names (shared with the quantization tests)."""
from __future__ import annotations

import json

from safetensors.torch import load_file

from viscpm.models.cpmbee import CPMBEE_KEY_RULES, CPMBee, CPMBeeConfig
from viscpm.models.keymap import official_to_ours


def golden_tiny_cpmbee(reference) -> CPMBee:
    """The official tiny CPM-Bee the golden outputs were made with, in our key names."""
    config = CPMBeeConfig.from_dict(json.loads((reference / "llm" / "tiny_cpmbee_config.json").read_text()))
    llm = CPMBee(config).eval()
    official = load_file(reference / "llm" / "tiny_cpmbee.safetensors")
    llm.load_state_dict({official_to_ours(k, CPMBEE_KEY_RULES): v for k, v in official.items()}, strict=True)
    return llm
