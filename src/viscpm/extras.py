"""Optional parts of viscpm, installed as pip extras (pyproject.toml): `serve`, `train`, `safety`, or
`all`. A missing one is an error that says which extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise MissingExtra(f"{feature} needs {error.name or module}, which is not installed: "
                           f"pip install 'viscpm[{extra}]' (or viscpm[all])") from error
