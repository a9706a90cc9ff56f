"""Shared fixtures: the golden reference data lives in ../shared/reference beside the repo root."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (REPO_ROOT / ".." / "shared" / "reference").resolve()


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"golden reference data not found at {REFERENCE}; clone the repo next to ../shared")
    return REFERENCE


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
