"""Rerankers: Chinese-CLIP loaded from a folder the test builds (the official ranker's numbers),
self-reranking with the tiny official-format chat model (its score is the training loss), Paint
keeping the best candidate, the switch values, and the adherence measurement."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.checkpoints import CheckpointError
from viscpm.pipelines.chat import VisCPMChat
from viscpm.pipelines.paint import candidate_seed
from viscpm.rerank import QUESTIONS, ChatSelfRanker, ChineseCLIPRanker, load_ranker
from viscpm.shapes.evaluate import evaluate_reranking

from ..checkpoint_fixtures import open_tiny
from ..models.chat_fixtures import official_tiny_state as chat_state
from .rerank_fixtures import write_chinese_clip


def images(n=4, size=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


# -- Chinese-CLIP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_chinese_clip(tmp_path_factory.mktemp("chinese-clip"))


def test_chinese_clip_loads_from_its_folder_and_gives_the_official_scores(clip_folder):
    """The official ranker: diag(logits_per_image) for the text [prompt] * 4, through the
    processor as the official call used it."""
    from transformers import ChineseCLIPProcessor

    ranker = load_ranker(clip_folder)  # the folder's model_type says Chinese-CLIP
    assert isinstance(ranker, ChineseCLIPRanker)
    candidates = images()
    ours = ranker("一只红色的猫", candidates)
    processor = ChineseCLIPProcessor(image_processor=ranker.image_processor, tokenizer=ranker.tokenizer)
    with torch.no_grad():
        inputs = processor(text=["一只红色的猫"] * 4, images=candidates, return_tensors="pt", padding=True)
        official = torch.diag(ranker.model(**inputs).logits_per_image)
    np.testing.assert_allclose(ours, official.numpy(), rtol=1e-5, atol=1e-5)
    assert len(set(ours)) == 4


def test_chinese_clip_truncates_long_prompts(clip_folder):
    ranker = ChineseCLIPRanker.from_pretrained(clip_folder)
    assert len(ranker("red cat " * 100, images(2))) == 2  # 200 words > 16 positions


def test_chinese_clip_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Chinese-CLIP model not found"):
        ChineseCLIPRanker.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "chinese_clip"}')
    with pytest.raises(CheckpointError, match="cannot load Chinese-CLIP"):
        load_ranker(tmp_path)


# -- self-reranking ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    torch.save(chat_state(reference), folder / "viscpm_chat_tiny_checkpoint.pt")
    shutil.copy(reference / "cpmbee" / "vocab.txt", folder / "vocab.txt")
    return VisCPMChat(folder / "viscpm_chat_tiny_checkpoint.pt",
                      config_path=reference / "chat" / "tiny_viscpm_chat_config.json", image_safety_checker=False)


def training_loss_score(chat, prompt, image, question):
    """-(mean token loss) of the chat-align training stage on (image, question, prompt as caption)."""
    from viscpm.prompt import convert_data_to_id
    from viscpm.tokenization import UNK_TOKEN
    from viscpm.train.recipes import PromptExample, chat_loss, collate_prompts, count_targets

    data = {"image": UNK_TOKEN * chat.config.query_num, "context": "", "question": question,
            "<ans>": chat.tokenizer.escape(prompt)}  # as chat_align builds its examples
    example = PromptExample(convert_data_to_id(chat.tokenizer, data), chat.transform(image)[0])
    batch = collate_prompts(chat.tokenizer, [example])
    with torch.no_grad():
        return -(chat_loss(chat.model, batch) / count_targets(batch)).item()


def test_self_rank_score_is_the_chat_models_training_loss(chat):
    candidates = images(3)
    ranker = ChatSelfRanker(chat)
    scores = ranker("a red cat on a sofa", candidates)
    expected = [training_loss_score(chat, "a red cat on a sofa", im, QUESTIONS["en"]) for im in candidates]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert len(set(scores)) == 3  # the image matters
    zh = ranker("一只红色的猫", candidates[:1])  # Chinese prompts are asked in Chinese
    np.testing.assert_allclose(zh, [training_loss_score(chat, "一只红色的猫", candidates[0], QUESTIONS["zh"])],
                               rtol=1e-5)


def test_self_rank_batches_give_the_same_scores(chat):
    candidates = images(5)
    np.testing.assert_allclose(ChatSelfRanker(chat, batch_size=2)("a <b> cat", candidates),
                               ChatSelfRanker(chat)("a <b> cat", candidates), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_paint_keeps_the_candidate_the_chat_model_likes_best(reference, paint_checkpoint_dir, chat):
    painter = open_tiny(reference, paint_checkpoint_dir, add_ranker=chat)  # a VisCPMChat: self-reranking with it
    assert isinstance(painter.ranker, ChatSelfRanker)
    result = painter.paint("a red cat", num_inference_steps=1, seed=20)[0]
    ranked = result.metadata["ranker"]
    assert ranked["name"] == "self" and ranked["candidate_seeds"] == [candidate_seed(20, j) for j in range(4)]
    assert result.seed == 20 and result.score == max(ranked["candidate_scores"])
    assert ranked["chosen"] == int(np.argmax(ranked["candidate_scores"]))
    chosen_seed = ranked["candidate_seeds"][ranked["chosen"]]  # the chosen candidate, painted alone
    alone = painter.paint("a red cat", num_inference_steps=1, seed=chosen_seed, add_ranker=False)[0]
    assert np.abs(np.asarray(alone.image, int) - np.asarray(result.image, int)).max() <= 1
    scores = ChatSelfRanker(chat)("a red cat", [alone.image])
    assert scores[0] == pytest.approx(result.score, abs=1e-4)


# -- switch values -----------------------------------------------------------------------------


def test_ranker_switch_values(chat, caplog):
    with caplog.at_level(logging.INFO, logger="viscpm"):
        assert load_ranker(None) is None
    assert "no chat model to self-rerank with" in caplog.text
    with pytest.raises(ValueError, match="self-reranking needs a chat model"):
        load_ranker(True)
    assert load_ranker(False) is None and load_ranker("off") is None
    assert load_ranker(None, chat=chat).chat is chat
    assert load_ranker("self", chat=lambda: chat).chat is chat  # a loader is called only when needed
    mine = lambda prompt, ims: [0.0] * len(ims)  # noqa: E731
    assert load_ranker(mine) is mine
    with pytest.raises(TypeError, match="add_ranker must be"):
        load_ranker(3)
    with pytest.raises(CheckpointError, match="not a Chinese-CLIP folder"):
        load_ranker("no/such/model")  # not Chinese-CLIP, and nothing given to open a chat model with
    assert load_ranker("my/chat", open_chat={"my/chat": chat}.get).chat is chat  # a chat folder: opened by the caller
    with pytest.raises(CheckpointError):
        load_ranker("no/such/model", open_chat=VisCPMChat)  # read as a chat model, which is not there


def test_any_model_with_answer_logprob_self_ranks():
    """rerank/ imports no pipeline: a chat model is whatever scores answers, asked per prompt language."""
    asked = []

    class Scorer:
        def answer_logprob(self, images, question, answer, *, image_safety_checker=None):
            asked.append((len(images), question, answer, image_safety_checker))
            return [float(i) for i in range(len(images))]

    ranker = load_ranker(Scorer())
    assert isinstance(ranker, ChatSelfRanker) and ChatSelfRanker(Scorer(), batch_size=2)("红猫", images(3)) == [0, 1, 0]
    assert asked == [(2, QUESTIONS["zh"], "红猫", False), (1, QUESTIONS["zh"], "红猫", False)]


# -- adherence measurement -----------------------------------------------------------------------


class CandidatePainter:
    """Paints candidate k of each prompt correctly when k == right, else blank."""

    def __init__(self, right: int):
        self.right = right

    def paint(self, prompt, num_images_per_prompt, seed, **options):
        from viscpm.shapes import render

        scene = self.scenes[prompt]
        out = []
        for k in range(num_images_per_prompt):
            image = render(scene) if k == self.right else Image.new("RGB", (64, 64), (255, 255, 255))
            out.append(type("Result", (), {"image": image, "seed": seed + k})())
        assert options["add_ranker"] is False and options["image_safety_checker"] is False
        return out


def test_adherence_with_and_without_reranking(tmp_path):
    from viscpm.shapes import build_corpora, read_jsonl
    from viscpm.shapes.corpus import CorpusSizes
    from viscpm.shapes.world import Scene

    sizes = CorpusSizes(train_images=4, text=4, eval_images=2, paint_prompts=6, zh_instruct=0)
    eval_dir = build_corpora(tmp_path / "shapes", seed=1, sizes=sizes).root / "eval"
    painter = CandidatePainter(right=2)
    painter.scenes = {i["prompt"]: Scene.from_dict(i["scene"]) for i in read_jsonl(eval_dir / "paint_prompts.jsonl")}
    rankers = {"knows": lambda prompt, ims: [1.0 if k == 2 else 0.0 for k in range(len(ims))],
               "first": lambda prompt, ims: [0.0] * len(ims)}
    metrics = evaluate_reranking(painter, rankers, eval_dir, num_candidates=4)
    adherence = metrics["rerank_adherence"]
    assert adherence["single"] == {"en": 0.0, "zh": 0.0}
    assert adherence["mean"] == {"en": 0.25, "zh": 0.25}
    assert adherence["reranked"] == {"knows": {"en": 1.0, "zh": 1.0}, "first": {"en": 0.0, "zh": 0.0}}
    assert adherence["oracle"] == {"en": 1.0, "zh": 1.0}
    attributes = metrics["rerank_attributes"]
    assert attributes["reranked"]["knows"] == {"en": 1.0, "zh": 1.0} and attributes["single"] == {"en": 0.0, "zh": 0.0}
    assert attributes["mean"] == {"en": 0.25, "zh": 0.25}
    assert metrics["rerank_items"] > 0 and set(metrics["rerank_seconds_per_prompt"]) == {"paint", "knows", "first"}


@pytest.mark.slow
def test_packaged_painter_self_reranks_with_the_packaged_chat_model():
    from viscpm.pipelines.defaults import has_default_model
    from viscpm.pipelines.paint import VisCPMPaint

    if not (has_default_model("paint") and has_default_model("chat")):
        pytest.skip("no packaged chat and paint models")
    painter = VisCPMPaint(progress_bar=False, image_safety_checker=False)
    assert isinstance(painter.ranker, ChatSelfRanker)
    result = painter.paint("a small red circle at the top left", num_inference_steps=2, seed=0)[0]
    assert result.metadata["ranker"]["name"] == "self" and len(result.metadata["ranker"]["candidate_seeds"]) == 4
    plain = VisCPMPaint(progress_bar=False, image_safety_checker=False, add_ranker=False)
    assert plain.ranker is None
    assert plain.paint("a small red circle", num_inference_steps=2, seed=0, add_ranker=True)[0].metadata["ranker"]
