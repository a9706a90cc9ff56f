"""VisCPM-Chat: BEiT-3 reads the image together with learnable queries, an MLP maps the query
outputs to the LLM width, and they replace the image placeholder embeddings of CPM-Bee's prompt.

Parts are named for what they are (``vision``, ``queries``, ``mapping``, ``llm``); the official
checkpoint's ``vpm``/``query`` names are mapped by ``CHAT_KEY_RULES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .beit3 import BEIT3_KEY_RULES, BEIT3_PRESETS, UNUSED_OFFICIAL_KEYS, BEiT3Config, BEiT3VisionEncoder
from .cpmbee import CPMBEE_KEY_RULES, CPMBEE_PRESETS, CPMBee, CPMBeeConfig, CPMBeeInputs, CPMBeeOutput
from .keymap import KeyRules, prefixed


@dataclass(frozen=True)
class ChatConfig:
    llm: CPMBeeConfig
    vision: BEiT3Config
    query_num: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "viscpm-chat", "llm": self.llm.to_dict(), "vision": self.vision.to_dict(),
                "query_num": self.query_num}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatConfig":
        """Our saved config, or the reference-style composite (``llm_config``,
        ``beit3_encoder_config``, ``query_num``; other keys ignored)."""
        if "llm_config" in data or "beit3_encoder_config" in data:
            missing = [k for k in ("llm_config", "beit3_encoder_config", "query_num") if k not in data]
            if missing:
                raise ValueError(f"chat config is missing {missing}")
            return cls(CPMBeeConfig.from_dict(data["llm_config"]),
                       BEiT3Config.from_official(data["beit3_encoder_config"]), int(data["query_num"]))
        missing = [k for k in ("llm", "vision", "query_num") if k not in data]
        if missing:
            raise ValueError(f"chat config is missing {missing}")
        return cls(CPMBeeConfig.from_dict(data["llm"]), BEiT3Config.from_dict(data["vision"]), int(data["query_num"]))


CHAT_PRESETS: dict[str, ChatConfig] = {
    # viscpm_chat_{balance,zhplus}_checkpoint.pt
    "viscpm-chat-10b": ChatConfig(CPMBEE_PRESETS["cpm-bee-10b"], BEIT3_PRESETS["beit3-large-patch16-224"], 64),
}

CHAT_KEY_RULES: KeyRules = (
    ("query", "queries"),
    ("mapping.{n}.{p}", "mapping.{n}.{p}"),
    *prefixed(BEIT3_KEY_RULES, "vpm.", "vision."),
    *prefixed(CPMBEE_KEY_RULES, "llm.", "llm."),
)
CHAT_UNUSED_OFFICIAL_KEYS = frozenset("vpm." + key for key in UNUSED_OFFICIAL_KEYS)


class ChatModel(nn.Module):
    """Freeze flags pick what trains: stage 1 freezes the LLM, stage 2 trains everything."""

    def __init__(self, config: ChatConfig, *, vision_trainable: bool = True, llm_trainable: bool = True):
        super().__init__()
        self.config = config
        dim_vision, dim_llm = config.vision.dim, config.llm.dim_model
        self.vision = BEiT3VisionEncoder(config.vision)
        self.queries = nn.Parameter(torch.empty(config.query_num, dim_vision))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.mapping = nn.Sequential(nn.Linear(dim_vision, dim_llm), nn.GELU(), nn.Linear(dim_llm, dim_llm))
        self.llm = CPMBee(config.llm)
        for part in (self.vision, self.mapping):
            part.requires_grad_(vision_trainable)
        self.queries.requires_grad_(vision_trainable)
        self.llm.requires_grad_(llm_trainable)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> vision hidden states (B, Q, d_llm) in the LLM's dtype."""
        query_states = self.vision(pixel_values, self.queries)  # (B, Q, d_vision)
        return self.mapping(query_states).to(self.llm.dtype)

    def embed(self, inputs: CPMBeeInputs, vision_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, d) with the image placeholders replaced by vision states.

        ``inputs.image_bound`` (B, 1, 2) holds [begin, end) of each row's placeholders; a row whose
        bound is empty (a text-only prompt) keeps its token embeddings. ``vision_hidden_states``
        (B', Q, d) has one entry per row *with* an image, in row order.
        """
        embeds = self.llm.embed_tokens(inputs.input_ids, inputs.input_id_subs)  # (B, L, d)
        if vision_hidden_states is None:
            return embeds
        bound = inputs.image_bound[:, 0]  # (B, 2)
        rows = (bound[:, 1] > bound[:, 0]).nonzero().view(-1)  # (B',)
        query_num = vision_hidden_states.size(1)
        if len(rows) != vision_hidden_states.size(0):
            raise ValueError(f"{len(rows)} prompts have image placeholders but {vision_hidden_states.size(0)} images were given")
        if not bool((bound[rows, 1] - bound[rows, 0] == query_num).all()):
            raise ValueError(f"image placeholders {bound.tolist()} do not hold {query_num} query tokens")
        positions = bound[rows, :1] + torch.arange(query_num, device=bound.device)  # (B', Q)
        embeds = embeds.clone()
        embeds[rows[:, None], positions] = vision_hidden_states.to(embeds.dtype)
        return embeds

    def forward(
        self,
        inputs: CPMBeeInputs,
        pixel_values: torch.Tensor | None = None,
        vision_hidden_states: torch.Tensor | None = None,
    ) -> CPMBeeOutput:
        """Training-style full pass: images (or precomputed states) in, logits over the prompt out.
        ``pixel_values`` has one image per row with image placeholders (text-only rows have none)."""
        if vision_hidden_states is None and pixel_values is not None:
            vision_hidden_states = self.encode_images(pixel_values)
        return self.llm(inputs, inputs_embeds=self.embed(inputs, vision_hidden_states))
