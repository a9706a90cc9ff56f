"""A fresh clone without the golden reference data: every test is still collected, and exactly the
tests that need the data are skipped, all with the one reason that names what is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, missing_reference

pytestmark = pytest.mark.slow  # two collections of the whole suite in fresh processes

# A plugin for the inner pytest: writes {node id: its skip reasons} once collection is done
REPORTER = '''
import json, os

def pytest_collection_finish(session):
    skips = {item.nodeid: [mark.kwargs.get("reason", "") for mark in item.iter_markers("skip")]
             for item in session.items}
    with open(os.environ["VISCPM_COLLECTED_TO"], "w", encoding="utf-8") as out:
        json.dump(skips, out)
'''


def collect(reference: Path, work: Path) -> dict[str, list[str]]:
    """Collect the whole suite in a fresh pytest that looks for the reference data at ``reference``."""
    (work / "collected_skips.py").write_text(REPORTER, encoding="utf-8")
    report = work / "collected.json"
    env = {**os.environ, "VISCPM_REFERENCE": str(reference), "VISCPM_COLLECTED_TO": str(report),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "collected_skips",
                          "-p", "no:cacheprovider", str(REPO_ROOT / "tests")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"collection failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return json.loads(report.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def empty_reference(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("no_reference")


@pytest.fixture(scope="module")
def collected_without(empty_reference, tmp_path_factory) -> dict[str, list[str]]:
    return collect(empty_reference, tmp_path_factory.mktemp("collect_without"))


def test_without_reference_data_skips_carry_one_reason(collected_without, empty_reference) -> None:
    reasons = {reason for skips in collected_without.values() for reason in skips}
    assert reasons == {missing_reference(empty_reference.resolve())}
    skipped = [node for node, skips in collected_without.items() if skips]
    assert 0 < len(skipped) < len(collected_without)  # the rest still runs
    # golden cases parametrised from the data files are collected, and skipped, not dropped
    for node in ("tests/test_tokenization.py::test_golden_case[case34]", "tests/test_prompt.py::test_convert_golden[nested_ans]",
                 "tests/test_prompt.py::test_pack_matches_process_list_golden[chat_unk_ext_q8]"):
        assert collected_without[node] == [missing_reference(empty_reference.resolve())], node


def test_reference_data_changes_what_runs_not_what_is_collected(reference, collected_without, tmp_path) -> None:
    collected_with = collect(reference, tmp_path)
    assert sorted(collected_with) == sorted(collected_without)
    assert not any(missing_reference(reference) in skips for skips in collected_with.values())
