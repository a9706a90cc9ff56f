"""`viscpm eval` prints a readable table (per-language metrics as rows, EN/ZH as columns), keeps
the full JSON for --out, and prints JSON on stdout only when asked (--json)."""
from __future__ import annotations

import json

import pytest

from viscpm.cli import main
from viscpm.metrics_table import format_metrics
from viscpm.shapes.corpus import CorpusSizes, build_corpora

SHAPES_METRICS = {
    "data": "built with seed 0",
    "qa_accuracy": {"en": 0.925, "zh": 0.88},
    "qa_accuracy_heldout_pairs": {"en": 0.9},
    "qa_accuracy_by_kind": {"en/colour": 0.95, "zh/colour": 0.9},
    "qa_items": 40,
    "examples": [{"question": "What colour is it?", "answer": "red"}],
    "caption_exact_pairs": None,
    "paint_attributes": {"en": {"shape": 0.9}, "zh": {"shape": 0.85}},
    "paint_settings": {"scheduler": "dpm++-sde", "steps": 20, "guidance_scale": 4.0},
    "rerank_seconds_per_prompt": {"paint": 1.234},
}


def test_table_rows_per_language_then_other_metrics():
    lines = format_metrics(SHAPES_METRICS).splitlines()
    assert lines[0].split() == ["EN", "ZH"]
    assert lines[1].split() == ["qa", "accuracy", "92.5", "%", "88.0", "%"]
    assert lines[2].split() == ["qa", "accuracy", "heldout", "pairs", "90.0", "%", "–"]  # no ZH items
    assert lines[3].split() == ["qa", "accuracy", "by", "kind", "·", "colour", "95.0", "%", "90.0", "%"]
    assert lines[4].split() == ["paint", "attributes", "·", "shape", "90.0", "%", "85.0", "%"]
    assert lines[5] == ""
    assert lines[6:] == ["data: built with seed 0", "qa items: 40", "caption exact pairs: –",
                         "paint settings: scheduler dpm++-sde, steps 20, guidance scale 4",
                         "rerank seconds per prompt: paint 1.23 s"]
    assert "red" not in format_metrics(SHAPES_METRICS)  # examples stay in the JSON
    assert len({len(line) for line in lines[:5]}) == 1  # the columns line up


def test_metrics_without_languages_need_no_table():
    assert format_metrics({"items": 3, "accuracy": 0.5}) == "items: 3\naccuracy: 50.0 %"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    sizes = CorpusSizes(train_images=8, text=8, eval_images=4, paint_prompts=4, zh_instruct=2)
    return build_corpora(tmp_path_factory.mktemp("shapes"), seed=3, sizes=sizes).root


def test_viscpm_eval_prints_a_table_writes_the_json_file_and_json_when_asked(shapes_data, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    command = ["eval", "shapes", "--skip-chat", "--skip-paint", "--data", str(shapes_data)]
    assert main([*command, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"data: {shapes_data}\n"
    assert json.loads(out.read_text()) == {"data": str(shapes_data)}
    assert main([*command, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"data": str(shapes_data)}


@pytest.mark.slow
def test_viscpm_eval_table_of_a_paint_run(shapes_data, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "shapes", "--skip-chat", "--data", str(shapes_data), "--limit", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == format_metrics(json.loads(out.read_text())) + "\n"
    header, first_row = printed.splitlines()[:2]
    assert header.split() in (["EN"], ["ZH"]) and first_row.startswith("paint adherence ") and "%" in first_row
