"""viscpm: bilingual (Chinese/English) multimodal VisCPM models — chat about images, paint from text."""

__version__ = "0.1.0"

from .pipelines.chat import VisCPMChat
from .pipelines.chat_options import ChatOptions

__all__ = ["ChatOptions", "VisCPMChat", "VisCPMPaint", "__version__"]


def __getattr__(name: str):
    # VisCPMPaint pulls in diffusers (seconds to import), so it loads on first use only
    if name == "VisCPMPaint":
        from .pipelines.paint import VisCPMPaint

        return VisCPMPaint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
