"""Self-reranking: VisCPM-Chat scores how well each painted candidate matches the prompt.

The score of an image is the chat model's mean log-probability per token of the prompt *as its
answer* to "Describe the image briefly." about that image — a teacher-forced pass in exactly the
training format (the chat-align prompt, with the prompt text in ``<ans>``), so no extra model is
needed. Higher is better; scores are comparable across the candidates of one prompt.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..prompt import IGNORE_INDEX, collate_for_forward, convert_data_to_id, make_generation_dict
from ..tokenization import CPMBeeTokenizer

# The question the chat model answers; Chinese prompts are asked in Chinese (the chat model was
# aligned to answer in the language it is asked in).
QUESTIONS = {"en": "Describe the image briefly.", "zh": "请简单描述这张图片。"}
BATCH_SIZE = 8
_CJK = re.compile(r"[\u3400-\u9fff]")


def prompt_language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


class ChatSelfRanker:
    """``ranker(prompt, images) -> scores`` with a :class:`~viscpm.pipelines.chat.VisCPMChat`."""

    name = "self"

    def __init__(self, chat, questions: Mapping[str, str] | str = QUESTIONS, batch_size: int = BATCH_SIZE):
        self.chat = chat
        self.questions = {"en": questions, "zh": questions} if isinstance(questions, str) else dict(questions)
        self.batch_size = batch_size

    def answer_inputs(self, prompt: str, n: int):
        """The collated training-style batch: ``n`` copies of image + question + the prompt as answer."""
        chat = self.chat
        question = self.questions[prompt_language(prompt)]
        data = make_generation_dict({"context": "", "question": CPMBeeTokenizer.escape(question),
                                     "<ans>": CPMBeeTokenizer.escape(prompt)}, chat.config.query_num)
        converted = convert_data_to_id(chat.tokenizer, data)
        return collate_for_forward([converted] * n, chat.tokenizer)

    @torch.no_grad()
    def __call__(self, prompt: str, images: Sequence[Image.Image]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            scores += self._score(prompt, list(images[start : start + self.batch_size]))
        return scores

    def _score(self, prompt: str, images: list[Image.Image]) -> list[float]:
        chat = self.chat
        model = chat.model
        inputs = self.answer_inputs(prompt, len(images)).to(chat.device)
        pixel_values = chat.transform(images).to(chat.device, model.vision.patch_embed.weight.dtype)
        out = model(inputs.input_ids, inputs.input_id_subs, inputs.image_bound, pixel_values=pixel_values,
                    position=inputs.position, context=inputs.context, sample_ids=inputs.sample_ids,
                    num_segments=inputs.num_segments, segment_ids=inputs.segment_ids,
                    segment_rel_offset=inputs.segment_rel_offset, segment_rel=inputs.segment_rel,
                    ext_table_ids=inputs.ext_table_ids, ext_table_sub=inputs.ext_table_sub, span=inputs.span)
        target = inputs.target  # (B, L): the answer's next tokens, IGNORE_INDEX elsewhere
        learn = target != IGNORE_INDEX
        log_probs = F.log_softmax(out.logits.float(), dim=-1)  # (B, L, V + E)
        picked = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L)
        return ((picked * learn).sum(1) / learn.sum(1)).tolist()

    def __repr__(self) -> str:
        return f"ChatSelfRanker(questions={self.questions})"
