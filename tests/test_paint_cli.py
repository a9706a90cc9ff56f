"""`viscpm paint` over the tiny official-format checkpoint."""
from __future__ import annotations

import io
import json
import subprocess
import sys

from PIL import Image

from viscpm.cli import build_parser, main, run_paint

from .test_paint_pipeline import CHECKPOINT, checkpoint_dir  # noqa: F401  (fixture)


def paint_args(reference, checkpoint_dir, *extra):  # noqa: F811
    return ["paint", "--model", str(checkpoint_dir / CHECKPOINT),
            "--config", str(reference / "paint" / "tiny_viscpm_paint_config.json"), "--steps", "2", *extra]


def test_paint_writes_a_png_with_its_settings(reference, checkpoint_dir, tmp_path):  # noqa: F811
    out = tmp_path / "cat.png"
    args = build_parser().parse_args(paint_args(reference, checkpoint_dir, "一只猫", "-o", str(out), "--seed", "3"))
    stdout = io.StringIO()
    assert run_paint(args, stdout=stdout) == 0
    assert stdout.getvalue().strip() == f"{out} (seed 3)"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)
        settings = json.loads(image.text["viscpm"])
    assert settings["prompt"] == "一只猫" and settings["num_inference_steps"] == 2


def test_several_images_are_numbered(reference, checkpoint_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cat.png"
    assert main(paint_args(reference, checkpoint_dir, "a cat", "-o", str(out), "--num-images", "2",
                           "--width", "48", "--scheduler", "ddim")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png", "cat-2.png"]
    with Image.open(tmp_path / "cat-2.png") as image:
        assert image.size == (48, 32)


def test_bad_size_exits_cleanly(reference, checkpoint_dir, tmp_path, capsys):  # noqa: F811
    assert main(paint_args(reference, checkpoint_dir, "a cat", "-o", str(tmp_path / "x.png"), "--size", "33")) == 2
    assert "height must be a positive multiple of 2" in capsys.readouterr().err


def test_scheduler_choices_are_the_pipeline_schedulers():
    from viscpm.pipelines.paint import SCHEDULERS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["paint"]._actions
                  if a.dest == "scheduler")
    assert sorted(action.choices) == sorted(SCHEDULERS)


def test_help_says_the_checks_are_off():
    result = subprocess.run([sys.executable, "-m", "viscpm.cli", "paint", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "WITHOUT them" in result.stdout and "安全检查" in result.stdout
