"""OpenAI chat messages -> one VisCPM turn: (image, question, context).

VisCPM keeps a conversation as the official context string ``User: …\\nAI: …\\n`` plus one image.
So: earlier user/assistant pairs become the context (through ``append_turn``, which escapes them
into the prompt markup), the last user message is the question, and the image is the most recent
one anywhere in the conversation: a new image mid-conversation replaces the old one and the
history is kept. Conversations without any image are text-only chats.

Choices where the API and VisCPM differ:
* ``system`` / ``developer`` messages are accepted and ignored: VisCPM has no system prompt (their
  text still counts toward the request's size limit).
* Consecutive user messages are joined with a newline into one turn (likewise assistant ones).
* One image per message at most: VisCPM reads one image per conversation.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..prompt import append_turn
from .errors import bad_request
from .schemas import ImagePart, Message, TextPart


@dataclass(frozen=True)
class Turn:
    question: str
    context: str  # the official context string of the earlier turns
    image_url: str | None  # the most recent image of the conversation
    text_chars: int  # all text of the conversation, for the request-size limit


def _split(message: Message, index: int) -> tuple[str, list[str]]:
    content = message.content
    if content is None or isinstance(content, str):
        return content or "", []
    texts = [part.text for part in content if isinstance(part, TextPart)]
    images = [part.image_url.url for part in content if isinstance(part, ImagePart)]
    if len(images) > 1:
        raise bad_request(f"messages[{index}] has {len(images)} images; VisCPM reads one image per message",
                          "too_many_images", f"messages[{index}].content")
    return "\n".join(texts), images


def to_turn(messages: list[Message]) -> Turn:
    context, image, chars = "", None, 0
    pending: list[str] = []  # user texts not answered yet
    answers: list[str] = []  # assistant texts not yet paired with a question
    last_role = None
    for index, message in enumerate(messages):
        text, images = _split(message, index)
        chars += len(text)
        if message.role in ("system", "developer"):
            continue
        if message.role == "assistant":
            if images:
                raise bad_request(f"messages[{index}] is an assistant message with an image; only user messages "
                                  "carry images", "invalid_message", f"messages[{index}].content")
            answers.append(text)
        else:
            if answers:  # close the previous turn
                context = append_turn(context, "\n".join(pending), "\n".join(answers))
                pending, answers = [], []
            pending.append(text)
            if images:
                image = images[0]
        last_role = message.role
    if last_role != "user":
        raise bad_request("the last message must be the user's question (role 'user')", "invalid_message",
                          "messages")
    question = "\n".join(t for t in pending if t)
    if not question.strip():
        raise bad_request("the last user message has no text; ask something (about the image)", "empty_question",
                          "messages")
    return Turn(question, context, image, chars)
