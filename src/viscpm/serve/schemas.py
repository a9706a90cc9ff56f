"""Request schemas: the OpenAI fields we honour, plus VisCPM's own options as extensions.

Fields of OpenAI's API that we do not use (``user``, ``quality``, ``logit_bias``, ...) are accepted
and ignored, as OpenAI-compatible servers do, so existing clients work unchanged. The pipelines'
per-call safety and ranking switches are declared here as fields (true, false or null; see
``app.switch_options``): a request can switch a checker or the ranker, never name one to load.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _utf8(text: str) -> str:
    # JSON may carry a lone surrogate ("\\ud800"), which no UTF-8 output can hold: refuse it here,
    # before a model works on it, rather than failing when the answer or the PNG is written
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the text holds a lone surrogate at character {error.start}, which is not "
                         "valid Unicode; send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def _switch(value):
    # only JSON true/false/null: a number or a string could ask for unbounded work or make the
    # server load files of the client's choosing (checkers and rankers are chosen at start-up)
    if value is None or isinstance(value, bool):
        return value
    raise ValueError("must be true, false or null (a per-request switch)")


Switch = Annotated[Union[bool, None], BeforeValidator(_switch)]
CHAT_SWITCHES = ("image_safety_checker",)
PAINT_SWITCHES = ("prompt_safety_checker", "image_safety_checker", "add_ranker")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: Text


class ImageURL(_Part):
    url: str
    detail: str | None = None  # accepted, not used: VisCPM reads every image at its own resolution


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Part):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None


class StreamOptions(_Part):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None  # None: this server's chat model
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name; wins over max_tokens
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; > 0: sampling
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1)
    # -- VisCPM extensions
    num_beams: int | None = Field(None, ge=1)  # > 1: the official beam search (not streamable)
    do_sample: bool | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    # the answer's language: auto (the question's), zh or en; None: the model is free (official)
    language: Literal["auto", "zh", "en"] | None = None
    image_safety_checker: Switch = None  # the input image's checker; null: the server's own


class ImageGenerationRequest(_Request):
    prompt: Text
    model: str | None = None  # None: this server's paint model
    n: int = Field(1, ge=1)
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"; None/auto: the model's own size
    response_format: Literal["b64_json", "url"] | None = None  # only b64_json is served
    stream: bool = False  # server-sent events: a progress event per denoising step, then one per image
    # -- VisCPM extensions
    negative_prompt: Text | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    scheduler: str | None = None  # ddpm (official), ddim, euler, dpm++, dpm++-sde
    preset: str | None = None  # official (DDPM, 50 steps) or fast (SDE-DPM-Solver++, 20 steps)
    # the painter's switches for this request; null: the server's own
    prompt_safety_checker: Switch = None
    image_safety_checker: Switch = None
    add_ranker: Switch = None
