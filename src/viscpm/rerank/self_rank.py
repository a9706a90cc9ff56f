"""Self-reranking: VisCPM-Chat scores how well each painted candidate matches the prompt.

The score of an image is the chat model's mean log-probability per token of the prompt *as its
answer* to "Describe the image briefly." about that image — a teacher-forced pass in exactly the
training format (the chat-align prompt, with the prompt text in ``<ans>``), so no extra model is
needed. Higher is better; scores are comparable across the candidates of one prompt.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from PIL import Image

# The question the chat model answers; Chinese prompts are asked in Chinese (the chat model was
# aligned to answer in the language it is asked in).
QUESTIONS = {"en": "Describe the image briefly.", "zh": "请简单描述这张图片。"}
BATCH_SIZE = 8
_CJK = re.compile(r"[\u3400-\u9fff]")


def prompt_language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


class ChatSelfRanker:
    """``ranker(prompt, images) -> scores`` with a chat model: a
    :class:`~viscpm.pipelines.chat.VisCPMChat`, or anything with its ``answer_logprob``."""

    name = "self"

    def __init__(self, chat, questions: Mapping[str, str] | str = QUESTIONS, batch_size: int = BATCH_SIZE):
        self.chat = chat
        self.questions = {"en": questions, "zh": questions} if isinstance(questions, str) else dict(questions)
        self.batch_size = batch_size

    def __call__(self, prompt: str, images: Sequence[Image.Image]) -> list[float]:
        question = self.questions[prompt_language(prompt)]
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start : start + self.batch_size])
            # painted candidates are screened by Paint's own checker, not here
            scores += self.chat.answer_logprob(batch, question, prompt, image_safety_checker=False)
        return scores

    def __repr__(self) -> str:
        return f"ChatSelfRanker(questions={self.questions})"
