"""Shared fixtures. The golden reference data (outputs of the official implementation on tiny
configs) lives in ../shared/reference beside the checkout, or wherever VISCPM_REFERENCE points.
Without it, every test that needs it (through the ``reference`` fixture) is skipped with one
reason, and the rest still run."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("VISCPM_REFERENCE") or REPO_ROOT / ".." / "shared" / "reference").resolve()


def missing_reference(path: Path) -> str:
    """The one skip reason of every test that needs the reference data."""
    return (f"needs the VisCPM golden reference data at {path} "
            "(../shared/reference beside the checkout, or set VISCPM_REFERENCE)")


MISSING_REFERENCE = missing_reference(REFERENCE)
# Its top-level folders: a folder without all of them (e.g. empty) counts as missing
REFERENCE_PARTS = ("chat", "cpmbee", "data", "llm", "manifest", "paint")

# Fixtures used by several test files live in these modules (registered once here, not imported per file)
pytest_plugins = ["tests.checkpoint_fixtures", "tests.pipelines.random_painter_fixtures", "tests.serve.serve_fixtures"]


def reference_present() -> bool:
    return all((REFERENCE / part).is_dir() for part in REFERENCE_PARTS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, before any fixture runs, every test whose fixtures reach ``reference``."""
    if reference_present():
        return
    missing = pytest.mark.skip(reason=MISSING_REFERENCE)
    for item in items:
        if "reference" in getattr(item, "fixturenames", ()):
            item.add_marker(missing)


@pytest.fixture(scope="session")
def reference() -> Path:
    if not reference_present():  # reached only through request.getfixturevalue
        pytest.skip(MISSING_REFERENCE)
    return REFERENCE


def load_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
