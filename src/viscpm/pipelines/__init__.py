"""Pipelines: check inputs → encode → generate → decode, no model math."""
from .chat import VisCPMChat

__all__ = ["VisCPMChat"]
