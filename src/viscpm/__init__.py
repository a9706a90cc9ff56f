"""viscpm: bilingual (Chinese/English) multimodal VisCPM models — chat about images, paint from text."""

__version__ = "0.1.0"

from .pipelines.chat import VisCPMChat

__all__ = ["VisCPMChat", "__version__"]
