"""Rerankers: score k painted candidates against their prompt; Paint keeps the best.

A ranker is any callable ``(prompt, images) -> scores`` (higher = better). What VisCPMPaint's
``add_ranker=`` switch accepts, resolved here:

* ``None`` (default): self-reranking with VisCPM-Chat when a chat model is available — painting
  with the packaged model uses the packaged chat model — else off (logged);
* ``True`` / ``"self"``: self-reranking, or an error when no chat model is available;
* ``False`` / ``"off"``: off;
* a chat model (a :class:`~viscpm.pipelines.chat.VisCPMChat`, or anything with its
  ``answer_logprob``): self-reranking with it;
* a folder: Chinese-CLIP when its ``config.json`` says ``"model_type": "chinese_clip"`` (the
  official ranker), else a chat model to self-rerank with, opened by the caller's ``open_chat``;
* a callable: used as is.

This package imports no pipeline: chat models come in as arguments (see docs/architecture.md, Layers).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..checkpoints import CheckpointError
from .clip import ChineseCLIPRanker
from .self_rank import QUESTIONS, ChatSelfRanker

logger = logging.getLogger(__name__)

__all__ = ["QUESTIONS", "ChatSelfRanker", "ChineseCLIPRanker", "Ranker", "load_ranker"]

Ranker = Callable[[str, Sequence[Image.Image]], Sequence[float]]


def _is_chinese_clip(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "chinese_clip"


def _is_chat(value) -> bool:
    return callable(getattr(value, "answer_logprob", None))


def load_ranker(spec=None, chat=None, open_chat: Callable[[str | os.PathLike], object] | None = None) -> Ranker | None:
    """The ranker a switch value names. ``chat``: the chat model to self-rerank with by default —
    a chat model, a function that loads one (called only when needed), or None. ``open_chat``:
    loads the chat model in a folder (e.g. ``VisCPMChat``); without it, a folder must be Chinese-CLIP."""
    name = spec.strip().lower() if isinstance(spec, str) else None
    if spec is False or name in ("off", "none", "false"):
        return None
    if spec is None or spec is True or name in ("default", "auto", "self"):
        if chat is None:
            if spec is None or name in ("default", "auto"):
                logger.info("add_ranker: no chat model to self-rerank with, so ranking is off")
                return None
            raise ValueError("self-reranking needs a chat model: pass add_ranker=VisCPMChat(...) (or its path), a "
                             "Chinese-CLIP folder, a callable (prompt, images) -> scores, or add_ranker=False")
        return ChatSelfRanker(chat if _is_chat(chat) else chat())
    if _is_chat(spec):
        return ChatSelfRanker(spec)
    if isinstance(spec, (str, os.PathLike)):
        if _is_chinese_clip(Path(spec)):
            return ChineseCLIPRanker.from_pretrained(spec)
        if open_chat is None:
            raise CheckpointError(f"{spec} is not a Chinese-CLIP folder (its config.json has no \"model_type\": "
                                  "\"chinese_clip\"); to self-rerank with a chat model, pass the loaded model")
        return ChatSelfRanker(open_chat(spec))
    if callable(spec):
        return spec
    raise TypeError(f"add_ranker must be None, a bool, a VisCPMChat, a model folder or a callable "
                    f"(prompt, images) -> scores, got {type(spec).__name__}")
