"""`viscpm paint` over the tiny official-format checkpoint."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from viscpm.cli import build_parser, main
from viscpm.cli.paint import run_paint
from viscpm.pipelines.paint import RANKER_CANDIDATES

from ..checkpoint_fixtures import PAINT_CHECKPOINT as CHECKPOINT


def paint_args(reference, paint_checkpoint_dir, *extra):
    return ["paint", "--model", str(paint_checkpoint_dir / CHECKPOINT),
            "--config", str(reference / "paint" / "tiny_viscpm_paint_config.json"), "--steps", "2", *extra]


@pytest.mark.slow
def test_paint_writes_a_png_with_its_settings(reference, paint_checkpoint_dir, tmp_path):
    out = tmp_path / "cat.png"
    args = build_parser().parse_args(paint_args(reference, paint_checkpoint_dir, "一只猫", "-o", str(out), "--seed", "3"))
    stdout = io.StringIO()
    assert run_paint(args, stdout=stdout) == 0
    assert stdout.getvalue().strip() == f"{out} (seed 3)"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)
        settings = json.loads(image.text["viscpm"])
    assert settings["prompt"] == "一只猫" and settings["num_inference_steps"] == 2


@pytest.mark.slow
def test_several_images_are_numbered(reference, paint_checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(paint_args(reference, paint_checkpoint_dir, "a cat", "-o", str(out), "--num-images", "2",
                           "--width", "48", "--scheduler", "ddim")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png", "cat-2.png"]
    with Image.open(tmp_path / "cat-2.png") as image:
        assert image.size == (48, 32)


def test_bad_size_exits_cleanly(reference, paint_checkpoint_dir, tmp_path, capsys):
    assert main(paint_args(reference, paint_checkpoint_dir, "a cat", "-o", str(tmp_path / "x.png"), "--size", "33")) == 2
    assert "height must be a positive multiple of 2" in capsys.readouterr().err


def test_scheduler_choices_are_the_pipeline_schedulers():
    from viscpm.pipelines.paint import SCHEDULERS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["paint"]._actions
                  if a.dest == "scheduler")
    assert sorted(action.choices) == sorted(SCHEDULERS)


def test_help_documents_the_safety_defaults():
    result = subprocess.run([sys.executable, "-m", "viscpm.cli", "paint", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for text in ("--prompt-checker", "--word-list", "--image-checker", "--ranker", "--candidates",
                 "viscpm[safety]", "exit status 3", "词表检查"):
        assert text in result.stdout


@pytest.mark.slow
def test_a_refused_prompt_exits_3_with_the_reason(reference, paint_checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(paint_args(reference, paint_checkpoint_dir, "a n.u.d.e cat", "-o", str(out))) == 3
    err = capsys.readouterr().err
    assert err.startswith("viscpm paint: the prompt 'a n.u.d.e cat' was refused: ")
    assert "blocked term 'nude' (written 'n.u.d.e')" in err and "nothing was painted" in err
    assert not out.exists()
    assert main(paint_args(reference, paint_checkpoint_dir, "a n.u.d.e cat", "-o", str(out), "--prompt-checker", "off",
                           "--image-checker", "off")) == 0


def test_word_list_adds_terms(reference, paint_checkpoint_dir, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("zombie\n", encoding="utf-8")
    args = paint_args(reference, paint_checkpoint_dir, "a Z0MBIE", "-o", str(tmp_path / "x.png"), "--word-list", str(words))
    assert main(args) == 3 and "'zombie' (written 'Z0MBIE')" in capsys.readouterr().err
    assert main([*args, "--prompt-checker", "off"]) == 2  # a word list needs the word list checker
    assert "--word-list adds terms" in capsys.readouterr().err


def test_flagged_images_are_written_black_and_reported(reference, paint_checkpoint_dir, tmp_path):
    from ..safety.safety_fixtures import sd_checker_folder

    checker = sd_checker_folder(tmp_path, threshold=-1.0)  # the official kind, flagging everything
    out = tmp_path / "cat.png"
    args = build_parser().parse_args(paint_args(reference, paint_checkpoint_dir, "a cat", "-o", str(out), "--seed", "1",
                                                "--image-checker", str(checker)))
    stdout = io.StringIO()
    assert run_paint(args, stdout=stdout) == 0
    assert stdout.getvalue().strip() == (f"{out} (seed 1; FLAGGED and written black: the Stable Diffusion safety "
                                         "checker detected an NSFW concept)")
    with Image.open(out) as image:
        assert max(image.getextrema()[0]) == 0 and json.loads(image.text["viscpm"])["flagged"] is True


@pytest.mark.slow
@pytest.mark.parametrize("flags, k", [(["--candidates", "3"], 3), ([], RANKER_CANDIDATES)])  # none: the pipeline's
def test_ranker_folder_picks_the_best_of_k(reference, paint_checkpoint_dir, tmp_path, capsys, flags, k):
    from ..rerank.rerank_fixtures import write_chinese_clip

    folder = write_chinese_clip(tmp_path / "chinese-clip")
    out = tmp_path / "cat.png"
    assert main(paint_args(reference, paint_checkpoint_dir, "a red cat", "-o", str(out), "--seed", "5",
                           "--ranker", str(folder), *flags)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out} (seed ") and line.endswith(f"; best of {k} by chinese-clip)")
    assert int(line.split("seed ")[1].split(";")[0]) in (5, 6, 7)


def test_image_mask_and_strength_edit_an_image(reference, paint_checkpoint_dir, tmp_path, capsys):
    """Issue 24: --image/--mask/--strength reach paint(); the PNG records the edit; bad inputs exit 2."""
    from ..checkpoint_fixtures import open_tiny

    source, mask, out = tmp_path / "source.png", tmp_path / "mask.png", tmp_path / "edited.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(source)
    drawn = Image.new("L", (32, 32), 0)
    drawn.paste(255, (0, 0, 16, 32))  # repaint the left half
    drawn.save(mask)
    assert main(paint_args(reference, paint_checkpoint_dir, "a blue square", "-o", str(out), "--seed", "4",
                           "--image", str(source), "--mask", str(mask), "--strength", "0.5")) == 0
    with Image.open(out) as image:
        settings = json.loads(image.text["viscpm"])
        written = image.convert("RGB").copy()
    assert settings["metadata"]["edit"] == {"mode": "inpaint", "strength": 0.5, "masked_share": 0.5}
    expected = open_tiny(reference, paint_checkpoint_dir).paint("a blue square", num_inference_steps=2, seed=4,
                                                        image=source, mask_image=mask, strength=0.5)[0].image
    assert written.tobytes() == expected.tobytes()
    Image.new("L", (16, 16), 255).save(mask)
    assert main(paint_args(reference, paint_checkpoint_dir, "x", "-o", str(out), "--image", str(source),
                           "--mask", str(mask))) == 2
    assert "mask_image is 16x16 but the image is 32x32" in capsys.readouterr().err
    assert main(paint_args(reference, paint_checkpoint_dir, "x", "-o", str(out), "--image", str(source),
                           "--strength", "2")) == 2
    assert "strength must be a number from 0" in capsys.readouterr().err
