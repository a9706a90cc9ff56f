"""Serving: an OpenAI-compatible HTTP API and a web page over VisCPMChat / VisCPMPaint.

``create_app(chat=..., paint=..., settings=ServeSettings(...))`` builds the FastAPI app; ``viscpm
serve`` builds the pipelines and runs it with uvicorn.
"""
from ..extras import require
from .settings import ServeSettings, check_binding, is_loopback

__all__ = ["ServeSettings", "check_binding", "create_app", "is_loopback"]


def __getattr__(name: str):
    # the app pulls in FastAPI; `viscpm --help` reads only the settings, so it loads on first use
    if name == "create_app":
        require("fastapi", "serve", "the viscpm server")
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
