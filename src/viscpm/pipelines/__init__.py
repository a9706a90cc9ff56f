"""Pipelines: check inputs → encode → generate → decode, no model math."""
from .chat import VisCPMChat

__all__ = ["VisCPMChat", "VisCPMPaint"]


def __getattr__(name: str):
    # VisCPMPaint pulls in diffusers (seconds to import), so it loads on first use only
    if name == "VisCPMPaint":
        from .paint import VisCPMPaint

        return VisCPMPaint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
