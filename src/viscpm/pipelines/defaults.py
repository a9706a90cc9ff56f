"""Where the model shipped inside the package lives, so ``VisCPMChat()`` works with no download."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

KINDS = ("chat", "paint")
PACKAGED_BYTES_LIMIT = 25_000_000  # both default models together, so the wheel stays small


def has_default_model(kind: str) -> bool:
    """Whether a default ``kind`` model is packaged."""
    try:
        default_model_path(kind)
    except FileNotFoundError:
        return False
    return True


def default_model_path(kind: str) -> Path:
    """The folder of the packaged default ``kind`` model (``viscpm/assets/<kind>``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    folder = Path(str(resources.files("viscpm") / "assets" / kind))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no default {kind} model is packaged at {folder}; pass model_path= (an official "
            f"viscpm_{kind}_*_checkpoint.pt with vocab_path=, or a folder saved by save_pretrained)"
        )
    return folder
