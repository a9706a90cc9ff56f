"""``viscpm eval paint`` and ``viscpm eval compare``: CLIP score and FID of painted images with tiny
random local models equal torchmetrics' own computation on the same images; ShapesWorld stays the
offline default."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.cli import main
from viscpm.evaluation.paint_scores import FID_IMAGE_SIZE, load_prompts, prompt_language

from ..rerank.rerank_fixtures import write_chinese_clip

PROMPTS = ["a red circle", "a blue square", "a green cat", "红色的猫", "红猫", "色"]


class TinyFeatures(torch.nn.Module):
    """A random stand-in for Inception: uint8 (N, 3, S, S) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv(images.float() / 255)
        return torch.tanh(x).mean(dim=(2, 3)) + x.amax(dim=(2, 3))


class InceptionLike(torch.nn.Module):
    """The clean-fid / StyleGAN calling convention: float pixels, ``return_features=True``."""

    def __init__(self):
        super().__init__()
        self.features = TinyFeatures()

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.features(images)
        return features if return_features else features.softmax(-1)


@pytest.fixture(scope="module")
def chinese_clip(tmp_path_factory):
    return write_chinese_clip(tmp_path_factory.mktemp("chinese_clip"))


@pytest.fixture(scope="module")
def feature_files(tmp_path_factory):
    """The two feature networks as TorchScript files, and the eager modules with the same weights."""
    folder = tmp_path_factory.mktemp("fid")
    torch.manual_seed(1)
    plain, inception = TinyFeatures().eval(), InceptionLike().eval()
    torch.jit.save(torch.jit.script(plain), folder / "tiny.pt")
    torch.jit.save(torch.jit.script(inception), folder / "inception_like.pt")
    return {folder / "tiny.pt": plain,
            folder / "inception_like.pt": lambda images: inception(images.float(), return_features=True)}


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference_images")
    rng = np.random.default_rng(0)
    for number in range(5):
        Image.fromarray(rng.integers(0, 256, (24 + number, 20, 3), dtype=np.uint8)).save(folder / f"ref{number}.png")
    (folder / "notes.txt").write_text("not an image: skipped")
    return folder


def resized(path) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((FID_IMAGE_SIZE, FID_IMAGE_SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def direct_fid(features, references, painted) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Wrapped(torch.nn.Module):  # torchmetrics needs a Module; the convention call is inside
        def forward(self, images):
            return features(images)

    metric = FrechetInceptionDistance(feature=Wrapped(), input_img_size=(3, FID_IMAGE_SIZE, FID_IMAGE_SIZE))
    metric.update(torch.stack([resized(p) for p in references]), real=True)
    metric.update(torch.stack([resized(p) for p in painted]), real=False)
    return float(metric.compute())


def direct_clip(folder, painted, prompts) -> tuple[float, float]:
    """torchmetrics' functional clip_score, and the same number by hand from the transformers model."""
    from torchmetrics.functional.multimodal import clip_score
    from transformers import BertTokenizer, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import ChineseCLIPImageProcessorPil

    from viscpm.evaluation.paint_scores import load_clip

    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in painted]
    library = float(clip_score(images, prompts, model_name_or_path=lambda: load_clip(folder)))
    model = ChineseCLIPModel.from_pretrained(folder).eval()
    pixels = ChineseCLIPImageProcessorPil.from_pretrained(folder)([Image.open(p).convert("RGB") for p in painted],
                                                                 return_tensors="pt").pixel_values
    text = BertTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = model.get_text_features(**text).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features)
    return library, max(100 * cosine.mean().item(), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["tiny.pt", "inception_like.pt"])
def test_clip_score_and_fid_equal_torchmetrics_on_the_painted_images(model_dir, chinese_clip, feature_files,
                                                                     reference_dir, tmp_path, network, capsys):
    network_file, features = next((path, f) for path, f in feature_files.items() if path.name == network)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["eval", "paint", "--model", str(model_dir), "--prompts", str(prompts_file), "--clip", str(chinese_clip),
            "--fid-features", str(network_file), "--reference-images", str(reference_dir), "--steps", "2",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert json.loads(capsys.readouterr().out) == report
    references = sorted(reference_dir.glob("*.png"))
    assert report["reference_images"]["count"] == len(references) == 5
    for lang in ("en", "zh"):
        chosen = [(p, out / "images" / f"{n:05d}.png") for n, p in enumerate(PROMPTS) if prompt_language(p) == lang]
        painted = [path for _, path in chosen]
        scores = report["scores"][lang]
        assert scores["images"] == 3 and scores["seconds_per_image"] > 0
        assert scores["fid"] == pytest.approx(direct_fid(features, references, painted), rel=1e-4, abs=1e-4)
        library, by_hand = direct_clip(chinese_clip, painted, [p for p, _ in chosen])
        assert scores["clip_score"] == pytest.approx(library, abs=1e-3)
        assert scores["clip_score"] == pytest.approx(by_hand, abs=1e-3)
    assert max(report["scores"][lang]["clip_score"] for lang in ("en", "zh")) > 0  # the clamp does not hide all

    # a re-run paints nothing again, and reports the same scores and times
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == stamps
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["scores"] == report["scores"]


def test_prompts_files_and_languages(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("海上生明月\n\na cat on a sofa\n", encoding="utf-8")
    assert [(p.prompt, p.lang) for p in load_prompts(text)] == [("海上生明月", "zh"), ("a cat on a sofa", "en")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a dog", "lang": "zh"}\n{"prompt": "一只狗"}\n', encoding="utf-8")
    assert [(p.prompt, p.lang) for p in load_prompts(jsonl)] == [("a dog", "zh"), ("一只狗", "zh")]
    jsonl.write_text('{"text": "a dog"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        load_prompts(jsonl)


def test_bad_flags_fail_before_painting(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["eval", "paint", "--prompts", str(prompts), "--fid-features", "x.pt", "--out", str(tmp_path)]) == 2
    assert "FID needs both --fid-features" in capsys.readouterr().err
    assert main(["eval", "paint", "--clip", str(tmp_path)]) == 2
    assert "score the images of --prompts FILE" in capsys.readouterr().err
    from viscpm.evaluation.paint_scores import load_clip, load_fid_features

    with pytest.raises(FileNotFoundError, match="no readable config.json"):
        load_clip(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_fid_features(tmp_path / "weights.pt")


@pytest.mark.slow
def test_shapesworld_adherence_stays_the_offline_default(tmp_path):
    from viscpm.shapes import build_corpora
    from viscpm.shapes.corpus import CorpusSizes

    sizes = CorpusSizes(train_images=4, text=4, eval_images=2, paint_prompts=2, zh_instruct=1)
    data = build_corpora(tmp_path / "shapes", seed=3, sizes=sizes).root
    out = tmp_path / "out"
    assert main(["eval", "paint", "--data", str(data), "--limit", "2", "--steps", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["benchmark"] == "paint-shapes" and report["details"]["paint_items"] == 2
    assert report["details"]["paint_settings"]["steps"] == 2
    assert set(report["scores"]) <= {"en", "zh", "all"} and report["scores"]["all"]["seconds_per_image"] > 0
    assert all(0 <= part["adherence"] <= 1 for lang, part in report["scores"].items() if lang != "all")


def write_llava_report(path, relative: dict, judge_model: str = "gpt-4-0613", rule_hash: str = "a" * 64):
    scores = {lang: {c: {"relative": v, "reference": 8.0, "model": 6.0, "scored": 30} for c, v in cats.items()}
              for lang, cats in relative.items()}
    path.write_text(json.dumps({
        "benchmark": "llava-bench-coco", "scores": scores,
        "judge": {"url": "https://api.openai.com/v1", "model": judge_model, "temperature": 0.2},
        "languages": {lang: {"data": {"sha256": {"rule_text": rule_hash}}} for lang in relative}}))
    return path


def test_compare_prints_the_per_category_difference(tmp_path, capsys):
    a = write_llava_report(tmp_path / "fp16.json", {"en": {"conv": 83.3, "detail": 68.9, "complex": 90.5, "all": 81.1}})
    b = write_llava_report(tmp_path / "int8.json", {"en": {"conv": 82.0, "detail": 70.0, "complex": 90.5, "all": 80.6}})
    assert main(["eval", "compare", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["fp16", "int8", "B", "-", "A"]
    assert lines[1].split() == ["en", "conv", "83.3", "82", "-1.3"]
    assert lines[2].split() == ["en", "detail", "68.9", "70", "+1.1"]
    assert lines[4].split() == ["en", "all", "81.1", "80.6", "-0.5"]
    assert not any("WARNING" in line for line in lines)

    other = write_llava_report(tmp_path / "new_judge.json", {"en": {"all": 75.0}, "zh": {"all": 70.0}},
                               judge_model="gpt-4o", rule_hash="b" * 64)
    assert main(["eval", "compare", str(a), str(other)]) == 0
    text = capsys.readouterr().out
    assert "zh all" in text and "judge model differs: gpt-4-0613 vs gpt-4o" in text
    assert "en rule text differs" in text


def test_compare_refuses_different_benchmarks_and_non_reports(tmp_path, capsys):
    a = write_llava_report(tmp_path / "a.json", {"en": {"all": 80.0}})
    paint = tmp_path / "paint.json"
    paint.write_text(json.dumps({"benchmark": "paint-prompts", "scores": {"en": {"fid": 20.0}}}))
    assert main(["eval", "compare", str(a), str(paint)]) == 2
    assert "cannot compare a llava-bench-coco report with a paint-prompts report" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["eval", "compare", str(a), str(tmp_path / "x.json")]) == 2
    assert "has no \"scores\"" in capsys.readouterr().err


def test_compare_names_report_json_columns_by_folder(tmp_path, capsys):
    (tmp_path / "bf16").mkdir()
    (tmp_path / "int8").mkdir()
    a = write_llava_report(tmp_path / "bf16" / "report.json", {"en": {"all": 80.0}})
    b = write_llava_report(tmp_path / "int8" / "report.json", {"en": {"all": 79.0}})
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:2] == ["bf16", "int8"]
