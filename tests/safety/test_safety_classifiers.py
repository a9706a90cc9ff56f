"""The official-kind checkers loaded from folders the tests build (tiny random configs saved with
save_pretrained and loaded back through the code a user runs), NudeNet, and what each switch
value resolves to."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.checkpoints import CheckpointError
from viscpm.safety import (
    BertPromptChecker, LexiconChecker, NudeNetImageChecker, SafetyResult, StableDiffusionImageChecker,
    load_image_checker, load_prompt_checker, screen_images,
)
from viscpm.safety import nudenet as nudenet_module

from .safety_fixtures import sd_checker_folder

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "cat", "red", "猫", "红"]


def write_vocab(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")


def bert_folder(root, unsafe_probability: float):
    """A tiny BertForSequenceClassification whose label-1 probability is the same for every
    prompt: the classifier head is zeroed and its bias set to log-odds."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = root / f"bert-{unsafe_probability}"
    write_vocab(folder)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, math.log(unsafe_probability / (1 - unsafe_probability))]))
    model.save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkers")
    return {"bert-unsafe": bert_folder(root, 0.8), "bert-borderline": bert_folder(root, 0.7),
            "sd-flags-all": sd_checker_folder(root, -1.0), "sd-flags-none": sd_checker_folder(root, 2.0),
            "sd-no-processor": sd_checker_folder(root, -1.0, with_processor=False), "root": root}


def picture(colour=(200, 30, 30), size=(48, 40)):
    return Image.new("RGB", size, colour)


# -- prompt classifier (BERT) --------------------------------------------------------------


def test_bert_checker_loads_from_a_folder_and_applies_the_official_rule(folders):
    unsafe = load_prompt_checker(folders["bert-unsafe"])  # a folder: the official kind
    assert isinstance(unsafe, BertPromptChecker)
    result = unsafe("a red cat")
    assert result.flagged and result.checker == "bert"
    assert result.details["score"] == pytest.approx(0.8, abs=1e-5)
    assert "score 0.80 > 0.75" in result.reason
    borderline = BertPromptChecker.from_pretrained(folders["bert-borderline"])
    assert not borderline("一只红猫")  # 0.7 is not above 0.75
    assert BertPromptChecker.from_pretrained(folders["bert-borderline"], threshold=0.5)("x").flagged


def test_bert_checker_truncates_long_prompts(folders):
    checker = BertPromptChecker.from_pretrained(folders["bert-unsafe"])
    assert checker("cat " * 200).flagged  # 200 words > 16 positions: truncated, no crash


def test_bert_checker_errors(folders, tmp_path):
    with pytest.raises(CheckpointError, match="prompt safety classifier not found"):
        BertPromptChecker.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="cannot load the prompt safety classifier"):
        BertPromptChecker.from_pretrained(broken)
    with pytest.raises(ValueError, match="unsafe_label 2 is not a label"):
        BertPromptChecker.from_pretrained(folders["bert-unsafe"], unsafe_label=2)


# -- Stable Diffusion safety checker -------------------------------------------------------


def test_sd_checker_loads_from_a_folder(folders):
    flags_all = load_image_checker(folders["sd-flags-all"])
    assert isinstance(flags_all, StableDiffusionImageChecker)
    result = flags_all(picture())
    assert result.flagged and "NSFW concept" in result.reason and result.checker == "sd-safety-checker"
    assert flags_all.image_processor.crop_size == {"height": 30, "width": 30}  # read from the folder
    flags_none = StableDiffusionImageChecker.from_pretrained(folders["sd-flags-none"])
    assert [bool(r) for r in flags_none.check_batch([picture(), picture((0, 0, 255), (20, 64))])] == [False, False]


def test_sd_checker_verdicts_match_diffusers_on_the_same_input(folders):
    """Our verdicts are the checker's own: same pixel values in, same flags out."""
    checker = StableDiffusionImageChecker.from_pretrained(folders["sd-flags-all"])
    pixels = checker.image_processor(images=[picture()], return_tensors="pt").pixel_values
    images, flags = checker.model(clip_input=pixels, images=np.ones((1, 4, 4, 3), dtype=np.float32))
    assert flags == [True] and images[0].max() == 0  # diffusers blacks it out itself
    assert checker(picture()).flagged == flags[0]


def test_sd_checker_without_a_preprocessor_config_uses_clip_defaults(folders, tmp_path):
    """As the official code: the checker folder plus openai/clip-vit-base-patch32's preprocessing,
    which is CLIP's standard one (224 px, CLIP mean/std)."""
    checker = StableDiffusionImageChecker.from_pretrained(folders["sd-no-processor"])
    assert checker.image_processor.crop_size == {"height": 224, "width": 224}
    assert checker.image_processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert checker(picture()).flagged
    with pytest.raises(CheckpointError, match="no image preprocessing config"):
        StableDiffusionImageChecker.from_pretrained(folders["sd-no-processor"], processor_path=tmp_path)


def test_sd_checker_errors(tmp_path):
    with pytest.raises(CheckpointError, match="image safety checker not found"):
        StableDiffusionImageChecker.from_pretrained(tmp_path)


# -- NudeNet --------------------------------------------------------------------------------


class FakeDetector:
    def __init__(self, detections):
        self.detections, self.seen = detections, []

    def detect(self, image):
        self.seen.append(image)
        return self.detections


def test_nudenet_rule_on_detections():
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.9, "box": [0, 0, 4, 4]},
               {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 4, 4]}]
    assert not NudeNetImageChecker(detector=FakeDetector(covered))(picture())
    weak = [{"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 0, 4, 4]}]
    assert not NudeNetImageChecker(detector=FakeDetector(weak))(picture())
    strong = [{"class": "BUTTOCKS_EXPOSED", "score": 0.81, "box": [0, 0, 4, 4]}]
    detector = FakeDetector(strong)
    result = NudeNetImageChecker(detector=detector)(picture((10, 20, 30)))
    assert result.flagged and result.reason == "NudeNet detected buttocks exposed (0.81)"
    assert detector.seen[0][0, 0].tolist() == [30, 20, 10]  # handed over as OpenCV reads files: BGR


def test_nudenet_bundled_model_passes_plain_images():
    pytest.importorskip("nudenet", reason="the viscpm[safety] extra is not installed")
    checker = load_image_checker(None)  # the default, when the extra is installed
    assert isinstance(checker, NudeNetImageChecker)
    from viscpm.shapes import render, sample_scene
    import random

    scene = render(sample_scene(random.Random(1)), 64)
    assert not checker(scene) and not checker(picture())


def test_without_nudenet_the_default_is_off_and_asking_for_it_says_how(monkeypatch, caplog):
    monkeypatch.setattr("viscpm.safety.nudenet_available", lambda: False)
    with caplog.at_level("INFO", logger="viscpm"):
        assert load_image_checker(None) is None
    assert "pip install 'viscpm[safety]'" in caplog.text
    with pytest.raises(ValueError, match=r"NudeNet, which is not installed: pip install 'viscpm\[safety\]'"):
        load_image_checker(True)
    with pytest.raises(ValueError, match="not installed"):
        load_image_checker("nudenet")
    with pytest.raises(ImportError, match="viscpm.safety"):
        monkeypatch.setattr(nudenet_module, "_detector", _missing_detector)
        NudeNetImageChecker()


def _missing_detector():
    raise ImportError(f"the NudeNet image checker needs the nudenet package: {nudenet_module.INSTALL_HINT}")


# -- switch values and helpers --------------------------------------------------------------


def test_prompt_switch_values():
    assert isinstance(load_prompt_checker(None), LexiconChecker)
    assert isinstance(load_prompt_checker(True), LexiconChecker)
    assert isinstance(load_prompt_checker("lexicon"), LexiconChecker)
    assert load_prompt_checker(False) is None and load_prompt_checker("off") is None
    mine = lambda text: False  # noqa: E731
    assert load_prompt_checker(mine) is mine
    with pytest.raises(TypeError, match="prompt_safety_checker must be"):
        load_prompt_checker(3)
    with pytest.raises(CheckpointError, match="not found"):
        load_prompt_checker("no-such-folder")


def test_image_switch_values():
    assert load_image_checker(False) is None and load_image_checker("off") is None
    mine = lambda image: False  # noqa: E731
    assert load_image_checker(mine) is mine
    with pytest.raises(TypeError, match="image_safety_checker must be"):
        load_image_checker(3.5)


def test_screen_images_blacks_out_and_reports():
    images = [picture(), picture((0, 255, 0)), picture((0, 0, 255))]
    flags = iter([False, SafetyResult(True, "too green", "mine"), True])
    kept, results = screen_images(lambda image: next(flags), images)
    assert [bool(r) for r in results] == [False, True, True]
    assert [r.reason for r in results] == ["", "too green", "flagged by the image safety checker"]
    assert kept[0] is images[0]
    assert all(np.asarray(im).max() == 0 and im.size == (48, 40) for im in kept[1:])
    assert screen_images(None, images)[0] == images
