"""A judge reached through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, LMDeploy,
Ollama, or another ``viscpm serve``), asked LLaVA's way for two scores on one line.

Two kinds of failure are kept apart: the endpoint failing (connection, 5xx, 429) is retried by the
``openai`` client itself (``max_retries``, with its back-off) and then raised; a reply that does
not start with two scores is asked again up to ``attempts`` times and then returned as
unparseable, with every raw reply, so the caller can count and report it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

logger = logging.getLogger(__name__)

# LLaVA's eval_gpt_review_visual.py: the system message and sampling of the 2023 GPT-4 reviews
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
DEFAULT_TEMPERATURE = 0.2
DEFAULT_MAX_TOKENS = 1024
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# local servers (vLLM, Ollama, viscpm serve without a key) accept any key, but the client needs one
PLACEHOLDER_KEY = "EMPTY"

_NUMBER = r"(\d+(?:\.\d+)?)"
# the first non-empty line holds exactly two numbers, split by spaces and/or a comma (also "，"/"、")
_SCORE_LINE = re.compile(rf"^\s*{_NUMBER}\s*(?:[,，、]\s*|\s+){_NUMBER}\s*$")


def parse_scores(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first non-empty line, or None when that line is anything else.

    LLaVA's parser read the first line split on spaces; a bad line became (-1, -1) and was
    averaged in. Here it is None, and the caller retries, then counts it. Scores outside 0–10
    (the rules ask for 1–10) are not a reply to the rules either."""
    first = next((line for line in reply.splitlines() if line.strip()), "")
    match = _SCORE_LINE.match(first.replace("*", ""))  # markdown bold around the scores is common today
    if match is None:
        return None
    scores = float(match.group(1)), float(match.group(2))
    return scores if all(0 <= s <= 10 for s in scores) else None


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Which judge, and how it is asked. Everything here goes into the report."""

    url: str
    model: str
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    attempts: int = 3  # replies asked for per question before it counts as unparseable
    key_env: str = DEFAULT_KEY_ENV
    timeout: float = 300.0
    max_retries: int = 5  # endpoint errors, retried by the openai client with back-off

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"judge attempts must be at least 1, got {self.attempts}")
        if not self.model:
            raise ValueError("name the judge model (--judge-model), e.g. gpt-4-0613 or the name a local server serves")

    def record(self) -> dict:
        """What the report keeps about the judge (never the key)."""
        return {"url": self.url, "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "attempts": self.attempts, "system_prompt": SYSTEM_PROMPT}


@dataclasses.dataclass
class Verdict:
    scores: tuple[float, float] | None  # (reference answer, model answer); None = unparseable
    replies: list[str]  # every raw reply, in order
    reported_model: str | None  # the model name the endpoint says answered (drifts behind aliases)


class JudgeUnavailable(RuntimeError):
    """The endpoint failed after the client's retries; what was judged so far is saved."""


class Judge:
    def __init__(self, settings: JudgeSettings, client=None):
        self.settings = settings
        if client is None:
            try:
                import openai
            except ImportError:
                raise ModuleNotFoundError("the judge client needs the openai package: pip install 'viscpm[eval]'") from None

            key = os.environ.get(settings.key_env) or PLACEHOLDER_KEY
            client = openai.OpenAI(base_url=settings.url, api_key=key, timeout=settings.timeout,
                                   max_retries=settings.max_retries)
        self.client = client

    def _ask(self, content: str):
        import openai

        try:
            return self.client.chat.completions.create(
                model=self.settings.model, temperature=self.settings.temperature, max_tokens=self.settings.max_tokens,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
            )
        except openai.APIError as error:  # connection, timeout and status errors, after the client's retries
            raise JudgeUnavailable(f"judge {self.settings.model} at {self.settings.url} failed: {error}") from error

    def review(self, content: str) -> Verdict:
        replies: list[str] = []
        reported = None
        for attempt in range(1, self.settings.attempts + 1):
            response = self._ask(content)
            reported = response.model or reported
            choice = response.choices[0] if response.choices else None
            reply = (choice.message.content if choice is not None else None) or ""
            replies.append(reply)
            scores = parse_scores(reply)
            if scores is not None:
                return Verdict(scores, replies, reported)
            logger.info("judge reply %d/%d has no score line: %r", attempt, self.settings.attempts, reply[:120])
        return Verdict(None, replies, reported)
